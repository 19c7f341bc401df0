"""tritonize.generate vs HF generate: tokens identical in fp32 (greedy), sampling distributions, eos, errors.

On CPU the engine's kernels run through the Triton interpreter, so the models are tiny and the runs short;
tests that need many rows (sampling statistics) run the ops' PyTorch references instead.
"""

import datetime
import threading

import pytest
import torch
import transformers
from helpers import relative_error

import tritonize
from tritonize import ops
from tritonize.generation import DecoderEngine, decode_loop, filter_logits, select_tokens
from tritonize.generation.api import ENGINE_ATTRIBUTE
from tritonize.generation.loop import MAX_CACHED_LOOPS, MAX_CACHED_PROMPT_GRAPHS, DecodeGraphCache, bucket_length

VOCAB = 97
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TINY)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=16)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1, eos_token_id=2)),
}


def tiny(family: str, device="cpu") -> torch.nn.Module:
    model = MODELS[family]().to(device).eval()
    for param in model.parameters():  # HF's init (std 0.02) gives near-uniform logits: make choices clear-cut
        if param.dim() == 2:
            param.data.normal_(0, 0.2)
    return model


def hf_generate(model, ids, mask=None, **kwargs) -> torch.Tensor:
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, **kwargs)


def left_padded(lengths: list[int], seq_len: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (len(lengths), seq_len))
    mask = (torch.arange(seq_len) >= seq_len - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def reference_ops(monkeypatch):
    """The ops run their PyTorch references (fast on CPU) instead of the interpreted Triton kernels."""
    monkeypatch.setattr(ops, "_runs_triton", lambda t: False)


# -- greedy tokens identical to HF ---------------------------------------------------------------------


@pytest.mark.parametrize("family", MODELS)
def test_greedy_matches_hf_batched_and_single(family):
    model = tiny(family)
    ids, mask = left_padded([7, 5, 2], 7)
    expected = hf_generate(model, ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    out = tritonize.generate(model, ids, mask, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    assert torch.equal(out, expected)
    single = ids[2:, 5:]
    expected = hf_generate(model, single, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    assert torch.equal(tritonize.generate(model, single, max_new_tokens=3, eos_token_id=[]), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_right_padded_rows_continue_like_each_row_alone(family):
    model = tiny(family)
    lengths = [6, 3]
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).long()
    out = tritonize.generate(model, ids, mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out[:, :6], ids)  # the prompt comes back as given
    for row, length in enumerate(lengths):
        alone = hf_generate(model, ids[row : row + 1, :length], max_new_tokens=4, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out[row, 6:], alone[0, length:])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_prefill_and_step_logits_match_hf(family):
    model = tiny(family)
    ids, mask = left_padded([6, 4], 6)
    engine = DecoderEngine(model)
    engine.reserve(2, 8)
    logits = [engine.prefill(ids, mask.bool())]
    new = torch.randint(3, VOCAB, (2, 2))
    logits += [engine.step(new[:, i]) for i in range(2)]
    for i, got in enumerate(logits):
        full_ids, full_mask = torch.cat([ids, new[:, :i]], 1), torch.cat([mask, torch.ones(2, i).long()], 1)
        position_ids = (full_mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            want = model(full_ids, attention_mask=full_mask, position_ids=position_ids).logits[:, -1]
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("family", MODELS)
def test_decode_steps_chain_the_layers_of_llama_style_models(family, monkeypatch):
    """With the chain on, Llama-style blocks run their decode-step GEMVs through ops.decoder_layer_chain
    (GPT-2's LayerNorms and ungated MLP do not), with the unchained step's logits. Off by default."""
    model = tiny(family)
    monkeypatch.delenv("TRITONIZE_DECODE_LAYER_CHAIN", raising=False)
    engine = DecoderEngine(model)
    assert not engine.chains_layers()
    monkeypatch.setenv("TRITONIZE_DECODE_LAYER_CHAIN", "1")
    assert DecoderEngine(model).chain_layers
    engine.chain_layers = True
    assert engine.chains_layers() == (family != "gpt2")
    monkeypatch.delenv("TRITONIZE_DECODE_LAYER_CHAIN")
    assert engine.rebuilt().chain_layers  # set by hand, kept when the engine is rebuilt for new weights
    ids, mask = left_padded([5, 3], 5)
    engine.reserve(2, 8)
    new = torch.randint(3, VOCAB, (2,))
    logits = {}
    for chain in (True, False):
        engine.chain_layers = chain
        engine.prefill(ids, mask.bool())
        logits[chain] = engine.step(new)
    assert relative_error(logits[True], logits[False]) < 1e-5


def test_eos_stops_and_pads_like_hf():
    model = tiny("llama")
    ids, mask = left_padded([5, 3], 5)
    free = hf_generate(model, ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0)[:, 5:]
    eos = int(free[0, 1])  # row 0 stops after 2 tokens; row 1 when (if) it produces the same token
    expected = hf_generate(model, ids, mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    out = tritonize.generate(model, ids, mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert (out[0, 7:] == 0).all()

    # both rows stop early: HF's output is shorter than max_new_tokens, so must ours be
    both = [int(free[0, 0]), int(free[1, 1])]
    expected = hf_generate(model, ids, mask, max_new_tokens=5, eos_token_id=both, pad_token_id=0)
    out = tritonize.generate(model, ids, mask, max_new_tokens=5, eos_token_id=both, pad_token_id=0)
    assert out.shape[1] < 5 + 5 and torch.equal(out, expected)


def test_min_new_tokens_blocks_eos_like_hf():
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (1, 4))
    eos = int(hf_generate(model, ids, max_new_tokens=1, eos_token_id=None, pad_token_id=0)[0, -1])
    expected = hf_generate(model, ids, max_new_tokens=5, min_new_tokens=3, eos_token_id=eos, pad_token_id=0)
    out = tritonize.generate(model, ids, max_new_tokens=5, min_new_tokens=3, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert eos not in out[0, 4:7].tolist()


def test_calls_inside_then_outside_inference_mode():
    """The engine's kept buffers made during a call under torch.inference_mode() are still writable by a
    later call outside it (inference tensors would refuse the in-place writes)."""
    model = tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.inference_mode():
        inside = tritonize.generate(model, ids, max_new_tokens=3, eos_token_id=[])
    outside = tritonize.generate(model, ids, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(inside, outside)
    assert torch.equal(outside, hf_generate(model, ids, max_new_tokens=3, eos_token_id=None, pad_token_id=0))


def test_min_new_tokens_changes_keep_one_loop():
    """min_new_tokens lives in the kept loop's device state: calls that differ only in it share one loop
    (one CUDA graph on a GPU) and each still blocks eos exactly as long as HF."""
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (1, 4))
    eos = int(hf_generate(model, ids, max_new_tokens=1, eos_token_id=None, pad_token_id=0)[0, -1])
    for min_new_tokens in (3, 0, 4):
        expected = hf_generate(model, ids, max_new_tokens=5, min_new_tokens=min_new_tokens, eos_token_id=eos,
                               pad_token_id=0)
        out = tritonize.generate(model, ids, max_new_tokens=5, min_new_tokens=min_new_tokens, eos_token_id=eos,
                                 pad_token_id=0)
        assert torch.equal(out, expected), min_new_tokens
    assert len(model._tritonize_decoder.decode_graphs) == 1


def test_engine_shares_weights_and_is_reused(reference_ops):
    model = tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 4))
    with torch.no_grad():
        logits_before = model(ids).logits
    tritonize.generate(model, ids, max_new_tokens=2, eos_token_id=[])
    engine = getattr(model, ENGINE_ATTRIBUTE)
    qkv = engine.layers[0].qkv_weight
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # one copy of the weights
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)  # the HF model still works on the shared views
    tritonize.generate(model, torch.randint(3, VOCAB, (3, 60)), max_new_tokens=6, eos_token_id=[])
    assert getattr(model, ENGINE_ATTRIBUTE) is engine and engine.cache_batch == 3 and engine.cache_len >= 66

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    tritonize.generate(model, ids, max_new_tokens=1, eos_token_id=[])
    assert getattr(model, ENGINE_ATTRIBUTE) is not engine  # a replaced parameter rebuilds the engine


def test_model_after_optimize_model(reference_ops):
    model = tiny("qwen2")
    ids, mask = left_padded([5, 2], 5)
    expected = hf_generate(model, ids, mask, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    tritonize.optimize_model(model)
    assert torch.equal(tritonize.generate(model, ids, mask, max_new_tokens=3, eos_token_id=[]), expected)


# -- state kept across calls ------------------------------------------------------------------------


def test_consecutive_calls_match_hf():
    """The engine's buffers and its kept decode loops serve call after call: each call gives HF's tokens
    whatever ran before. Call 2 has call 1's batch and settings, so it resets and reuses call 1's loop (a
    stale index, eos state or length would show in its tokens); call 3 is a smaller batch on the same
    caches, call 4 a larger one, which grows the caches and so drops the kept loops."""
    model = tiny("llama")
    ids, mask = left_padded([7, 5, 2], 7)
    free = hf_generate(model, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)[:, 7:]
    eos = int(free[0, 1])  # row 0 of call 1 finishes at its second token
    calls = [(ids, mask, 6), (*left_padded([4, 4, 1], 4), 4), (*left_padded([3, 2], 3), 5),
             (*left_padded([6, 6, 3, 5], 6), 3)]
    kept_loops = []
    for ids, mask, new in calls:
        expected = hf_generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
        out = tritonize.generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, expected)
        kept_loops.append(len(getattr(model, ENGINE_ATTRIBUTE).decode_graphs))
    assert kept_loops == [1, 1, 2, 1]


def rows_padded_to(length: int) -> list[int]:
    """Row lengths of a batch padded to `length`: the longest row, one a little shorter and one of a single token."""
    return [length, max(1, length - 7), 1]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_prompt_padded_to_its_bucket_gives_the_unpadded_logits(family, monkeypatch):
    """prefill_bucketed pads the prompts on the left to a multiple of 64 with masked positions, in buffers kept
    per (batch, bucket): the first logits and the decode steps after them are those of the unpadded prefill,
    for prompt lengths on both sides of a bucket edge, batched with padding. (Llama through the kernels,
    whose attention skips the masked keys it scans for; the others through the op references, faster.)"""
    if family != "llama":
        monkeypatch.setattr(ops, "_runs_triton", lambda t: False)
    model = tiny(family)
    engine = DecoderEngine(model)
    engine.reserve(3, 65 + 2, padding=bucket_length(65) - 65)  # room for every case: no growth, buckets kept
    kept_buckets = []
    for length in (1, 63, 64, 65):
        ids, mask = left_padded(rows_padded_to(length), length)
        new = torch.randint(3, VOCAB, (3, 2))
        logits = {}
        for bucketed in (False, True):
            first = engine.prefill_bucketed(ids, mask) if bucketed else engine.prefill(ids, mask.bool())
            logits[bucketed] = torch.stack([first.clone()] + [engine.step(new[:, i]) for i in range(2)])
        assert relative_error(logits[True], logits[False]) < 1e-5, length
        kept_buckets.append(len(engine.prefill_graphs))
    assert kept_buckets == [1, 1, 1, 2]  # one bucket of 64 (lengths 1 to 64), then one of 128
    with pytest.raises(ValueError, match="call reserve"):
        engine.prefill_bucketed(*left_padded([200], 200))  # bucket 256 > the caches' 192


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calls_within_and_across_prompt_buckets_match_hf(family):
    """The prompt buffers serve call after call with HF's tokens. Call 2 has call 1's batch and bucket but
    shorter prompts: the same buffers, whose positions call 1 filled must be masked again; call 3 crosses
    into the next bucket and needs longer caches (grown: the kept buckets are dropped); call 4 is back in
    the first bucket."""
    model = tiny(family)
    kept_buckets = []
    for lengths, new in [([63, 40], 4), ([5, 1], 4), ([65, 64], 3), ([64, 1], 3)]:
        ids, mask = left_padded(lengths, max(lengths))
        expected = hf_generate(model, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
        assert torch.equal(tritonize.generate(model, ids, mask, max_new_tokens=new, eos_token_id=[]), expected)
        kept_buckets.append(len(getattr(model, ENGINE_ATTRIBUTE).prefill_graphs))
    assert kept_buckets == [1, 1, 1, 2]


def test_bucket_padding_does_not_count_against_learned_positions(reference_ops):
    """GPT-2's 256 learned positions bound prompt + new tokens, not the bucket's padding in the cache."""
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (1, 250))  # bucket 256: 250 + 6 fits the positions, 256 + 6 would not
    expected = hf_generate(model, ids, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert torch.equal(tritonize.generate(model, ids, max_new_tokens=6, eos_token_id=[]), expected)
    with pytest.raises(ValueError, match="learned positions"):
        tritonize.generate(model, ids, max_new_tokens=7, eos_token_id=[])


def test_kept_prompt_buckets_are_bounded(reference_ops):
    model = tiny("llama")
    for batch in range(MAX_CACHED_PROMPT_GRAPHS + 2, 0, -1):  # the largest first: the caches never grow
        tritonize.generate(model, torch.randint(3, VOCAB, (batch, 3)), max_new_tokens=1, eos_token_id=[])
        engine = getattr(model, ENGINE_ATTRIBUTE)
    assert len(engine.prefill_graphs) == MAX_CACHED_PROMPT_GRAPHS


class Script:
    """A fake engine whose step t makes row b choose rows[b][t + 1] (greedy); `start` begins a new script."""

    def __init__(self, vocab: int = 10) -> None:
        self.vocab, self.rows, self.steps = vocab, [], 0

    def logits(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([r[self.steps] for r in self.rows]), self.vocab).float()

    def start(self, rows: list[list[int]]) -> torch.Tensor:
        self.rows, self.steps = rows, 0
        return self.logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return self.logits()


def test_kept_loop_is_reset_returns_new_tensors_and_stays_bounded():
    script, cache = Script(), DecodeGraphCache()
    settings = dict(eos_token_id=9, pad_token_id=0, eos_check_every=1, graph_cache=cache)
    first = decode_loop(script.step, script.start([[4, 9, 5, 6], [3, 4, 9, 5]]), max_new_tokens=4, **settings)
    assert first.tolist() == [[4, 9, 0], [3, 4, 9]]
    second = decode_loop(script.step, script.start([[1, 2, 3, 4, 5], [5, 6, 7, 9, 8]]), max_new_tokens=5, **settings)
    assert len(cache) == 1  # the same loop, reset: no eos state, index or length left from the first call
    assert second.tolist() == [[1, 2, 3, 4, 5], [5, 6, 7, 9, 0]]
    assert first.tolist() == [[4, 9, 0], [3, 4, 9]]  # not a view of the kept buffer
    for pad in range(1, MAX_CACHED_LOOPS + 2):  # other settings, other loops: the oldest are dropped
        decode_loop(script.step, script.start([[1, 2]]), max_new_tokens=2, **(settings | dict(pad_token_id=pad)))
    assert len(cache) == MAX_CACHED_LOOPS


# -- sampling -----------------------------------------------------------------------------------------


def test_filters_match_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50) * 3
    logits[0, :5] = logits[0, 5]  # ties at the top-k and top-p boundaries
    for temperature, top_k, top_p in [(0.7, 10, 0.9), (1.3, 5, None), (1.0, None, 0.5), (0.5, 1, 0.2)]:
        want = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p:
            want = TopPLogitsWarper(top_p)(None, want)
        got = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


SAMPLING_SETTINGS = [(0.6, None, None), (1.5, 20, None), (0.7, None, 0.8), (0.8, 12, 0.9)]


def assert_follows(tokens: torch.Tensor, logits: torch.Tensor, temperature: float, top_k, top_p) -> float:
    """Samples `tokens` never leave the filtered support and their frequencies are within a total-variation
    bound of softmax(filtered logits): about 4x the bound's expected value, sum(sqrt(2/pi) sigma_i) / 2."""
    expected = filter_logits(logits[None], temperature=temperature, top_k=top_k, top_p=top_p)[0].double().softmax(-1)
    counts = torch.bincount(tokens, minlength=logits.shape[0]).double()
    assert counts[expected == 0].sum() == 0  # nothing outside top-k / top-p, ever
    bound = 0.8 * (expected * (1 - expected) / tokens.numel()).sqrt().sum().item()
    distance = 0.5 * (counts / tokens.numel() - expected).abs().sum().item()
    assert distance <= bound, f"total variation {distance:.4f} >= {bound:.4f}"
    return bound


@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING_SETTINGS)
def test_loop_samples_follow_filtered_softmax(temperature, top_k, top_p):
    samples, logits = 100_000, torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    tokens = decode_loop(None, logits.expand(samples, -1), max_new_tokens=1, do_sample=True, temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(1234))[:, 0]
    bound = assert_follows(tokens, logits, temperature, top_k, top_p)
    wrong = filter_logits(logits[None], temperature=temperature * 1.25, top_k=top_k, top_p=top_p)[0].softmax(-1)
    right = filter_logits(logits[None], temperature=temperature, top_k=top_k, top_p=top_p)[0].softmax(-1)
    assert 0.5 * (wrong - right).abs().sum().item() > 2 * bound  # the test would see a wrong temperature


@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING_SETTINGS[::3])
def test_sampled_first_token_follows_filtered_softmax(temperature, top_k, top_p, reference_ops):
    samples = 3000
    model = tiny("llama")
    prompt = torch.randint(3, VOCAB, (1, 3))
    engine = DecoderEngine(model)  # the logits generate samples from (HF's differ in the last bits, which
    engine.reserve(1, 4)  # can move a token across the top-p edge)
    with torch.no_grad():
        logits = engine.prefill(prompt, torch.ones_like(prompt, dtype=torch.bool))[0]
    out = tritonize.generate(model, prompt.expand(samples, -1), max_new_tokens=1, do_sample=True,
                             temperature=temperature, top_k=top_k or 0, top_p=top_p,
                             generator=torch.Generator().manual_seed(1234))
    assert_follows(out[:, -1], logits, temperature, top_k, top_p)


def test_top_k_one_is_greedy(reference_ops):
    model = tiny("mistral")
    ids, mask = left_padded([6, 3], 6)
    greedy = tritonize.generate(model, ids, mask, max_new_tokens=6, eos_token_id=[])
    sampled = tritonize.generate(model, ids, mask, max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1,
                                 temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


# -- the loop on its own (the contract engines code against) ---------------------------------------


def scripted_step(rows: list[list[int]], vocab: int = 10):
    """A fake model whose step t makes each row choose rows[b][t + 1] (greedy); the calls it got are recorded."""
    fed = []

    def logits_for(t: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([r[t] for r in rows]), vocab).float()

    def step(tokens: torch.Tensor) -> torch.Tensor:
        fed.append(tokens.clone())
        return logits_for(len(fed))

    return logits_for(0), step, fed


@pytest.mark.parametrize("check_every", [1, 4])
def test_loop_stops_when_every_row_finished(check_every):
    first, step, fed = scripted_step([[4, 9, 5, 6, 7, 7, 7, 7], [3, 4, 9, 5, 6, 6, 6, 6]])
    out = decode_loop(step, first, max_new_tokens=8, eos_token_id=9, pad_token_id=0, eos_check_every=check_every)
    assert out.tolist() == [[4, 9, 0], [3, 4, 9]]  # HF's length: 3 steps; row 0 padded after its eos
    assert torch.equal(fed[0], torch.tensor([4, 3]))  # step gets the tokens just chosen
    assert len(fed) == (2 if check_every == 1 else 3)  # extra steps only up to the next check


def test_loop_min_new_tokens_and_pad_default():
    first, step, _ = scripted_step([[9, 9, 1, 1, 1], [3, 4, 4, 8, 4]])
    first = first + torch.nn.functional.one_hot(torch.tensor([2, 2]), 10) * 0.5  # second choice: token 2
    out = decode_loop(step, first, max_new_tokens=5, min_new_tokens=1, eos_token_id=[9, 8])
    assert out.tolist() == [[2, 9, 9, 9], [3, 4, 4, 8]]  # eos blocked at step 0 only; pad defaults to the first eos


def test_loop_and_generate_reject_bad_arguments():
    first, step, _ = scripted_step([[1, 2]])
    for bad in [dict(max_new_tokens=0), dict(max_new_tokens=2, do_sample=True, temperature=0.0),
                dict(max_new_tokens=2, do_sample=True, top_p=1.5), dict(max_new_tokens=2, eos_check_every=0),
                dict(max_new_tokens=2, eos_token_id=-1)]:
        with pytest.raises(ValueError):
            decode_loop(step, first, **bad)
    with pytest.raises(ValueError, match="bert.*supported: llama, mistral, qwen2, qwen3, gpt2"):
        tritonize.generate(transformers.BertLMHeadModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True)).eval(),
            torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    model = tiny("llama")
    with pytest.raises(ValueError, match="no lm_head"):
        tritonize.generate(model.model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="int64 tensor"):
        tritonize.generate(model, torch.zeros(3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="is on meta"):
        tritonize.generate(model, torch.zeros(1, 3, dtype=torch.long, device="meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one real token"):
        tritonize.generate(model, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]),
                           max_new_tokens=2)
    model.generation_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match="repetition_penalty"):
        tritonize.generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


def test_select_tokens_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(select_tokens(logits), logits.argmax(-1))


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_bf16_agrees_with_hf_on_cuda():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024,
        vocab_size=1000)).to("cuda", torch.bfloat16).eval()
    for param in model.parameters():
        if param.dim() == 2:
            param.data.normal_(0, 0.05)
    ids, mask = left_padded([32, 20, 9, 32] * 4, 32)
    ids, mask = ids.cuda(), mask.cuda()
    expected = hf_generate(model, ids, mask, max_new_tokens=64, eos_token_id=None, pad_token_id=0)[:, 32:]
    # Free-running rows part at the first near tie (bf16 rounding differs between kernels) and never meet
    # again, so the engine is stepped along HF's tokens and its next-token choice compared at each of the
    # 16 x 64 positions.
    engine = DecoderEngine(model)
    engine.reserve(16, 96)
    with torch.no_grad():
        logits = engine.prefill(ids, mask.bool())
        agree = 0
        for t in range(64):
            agree += (logits.argmax(-1) == expected[:, t]).sum().item()
            logits = engine.step(expected[:, t].clone())
    assert agree / (16 * 64) >= 0.95, agree


@pytest.mark.gpu
def test_cuda_graph_loop():
    model = tiny("qwen3", device="cuda")
    ids, mask = left_padded([9, 4, 7], 9)
    ids, mask = ids.cuda(), mask.cuda()

    def run(graph: bool, seed: int | None = None) -> torch.Tensor:
        sampling = dict(do_sample=True, generator=torch.Generator("cuda").manual_seed(seed)) if seed is not None else {}
        return tritonize.generate(model, ids, mask, max_new_tokens=40, eos_token_id=[], cuda_graph=graph, **sampling)

    assert torch.equal(run(graph=True), run(graph=False))
    assert torch.equal(run(graph=True, seed=7), run(graph=True, seed=7))  # the generator drives the replays
    assert not torch.equal(run(graph=True, seed=7), run(graph=True, seed=8))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chained_decode_steps_gpu(family, monkeypatch):
    """TRITONIZE_DECODE_LAYER_CHAIN=1 on a GPU: the graphed decode loop through the persistent layer kernel
    gives the unchained engine's greedy tokens, at batch 1 and 2 (the kernel) and 3 (the four ops)."""
    model = tiny(family, device="cuda")
    for lengths in ([9], [9, 4], [9, 4, 7]):
        ids, mask = (t.cuda() for t in left_padded(lengths, max(lengths)))
        tokens = {}
        for chain in ("0", "1"):
            monkeypatch.setenv("TRITONIZE_DECODE_LAYER_CHAIN", chain)
            if hasattr(model, ENGINE_ATTRIBUTE):
                delattr(model, ENGINE_ATTRIBUTE)  # a new engine reads the setting
            tokens[chain] = tritonize.generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
        assert torch.equal(tokens["1"], tokens["0"]), lengths


@pytest.mark.gpu
def test_decode_graph_is_kept_across_calls(graph_captures):
    """A call with the batch and settings of an earlier one replays its graphs (no capture: the decode loop's,
    and the prefill's of its prompt bucket) and gives the eager loop's tokens; so does one with another
    max_new_tokens of the same capacity; sampling with the same generator re-seeded draws the same tokens
    from the kept graph. Each new key captures two graphs: the prefill's and the loop's."""
    model = tiny("qwen3", device="cuda")

    def graphed_and_eager(lengths: list[int], new: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = (t.cuda() for t in left_padded(lengths, max(lengths)))
        return tuple(tritonize.generate(model, ids, mask, max_new_tokens=new, eos_token_id=[], cuda_graph=graph)
                     for graph in (True, False))

    for lengths, new, captures in [([9, 4, 7], 40, 2), ([5, 5, 2], 40, 2), ([12, 3, 8], 21, 2), ([6, 6], 30, 4)]:
        graphed, eager = graphed_and_eager(lengths, new)
        assert torch.equal(graphed, eager)
        assert len(graph_captures) == captures, (lengths, new)

    ids, mask = (t.cuda() for t in left_padded([9, 4, 7], 9))
    generator = torch.Generator("cuda")

    def sample(seed: int) -> torch.Tensor:
        generator.manual_seed(seed)
        return tritonize.generate(model, ids, mask, max_new_tokens=40, eos_token_id=[], do_sample=True,
                                  generator=generator)

    first = sample(7)
    captures = len(graph_captures)
    assert torch.equal(sample(7), first)
    assert not torch.equal(sample(8), first)
    assert len(graph_captures) == captures


@pytest.mark.gpu
def test_prefill_graph_is_kept_across_calls(graph_captures):
    """A prompt of another length in the same bucket of 64 replays the bucket's kept prefill graph (no capture)
    into the same output buffer, with the eager prefill's logits and caches (the decode steps after it
    agree); the next bucket captures one more graph; growing the caches drops them."""
    model = tiny("llama", device="cuda")
    engine = DecoderEngine(model)
    engine.reserve(3, 70 + 4, padding=bucket_length(70) - 70)
    outputs = []
    for lengths, captures in [([9, 4, 7], 1), ([60, 64, 1], 1), ([1, 1, 1], 1), ([65, 3, 70], 2)]:
        ids, mask = (t.cuda() for t in left_padded(lengths, max(lengths)))
        new = torch.randint(3, VOCAB, (3, 4), device="cuda")
        logits = {}
        for graph in (True, False):
            first = engine.prefill_bucketed(ids, mask, cuda_graph=graph)
            if graph:
                outputs.append(first.data_ptr())
            logits[graph] = torch.stack([first.clone()] + [engine.step(new[:, i]) for i in range(4)])
        assert torch.equal(logits[True], logits[False]), lengths
        assert len(graph_captures) == captures and len(engine.prefill_graphs) == captures, lengths
    assert outputs[0] == outputs[1] == outputs[2] != outputs[3]  # a bucket's graph writes one output buffer
    engine.reserve(4, 74)
    assert len(engine.prefill_graphs) == 0


@pytest.mark.gpu
def test_prefill_graph_tokens_equal_eager_for_other_families():
    """GPT-2 (learned positions) and Qwen2 (q/k/v biases) prefill from graphs too, around the bucket edges."""
    for family in ("qwen2", "gpt2"):
        model = tiny(family, device="cuda")
        for lengths in ([63, 20], [64, 1], [65, 64], [1, 1]):
            ids, mask = (t.cuda() for t in left_padded(lengths, max(lengths)))
            graphed, eager = (tritonize.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[],
                                                 cuda_graph=graph) for graph in (True, False))
            assert torch.equal(graphed, eager), (family, lengths)


# -- tensor parallelism (2 ranks as threads of this process, over gloo) -------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # GQA with q/k/v biases; GPT-2's fused Conv1D qkv
def test_tensor_parallel_engine_matches_hf(family, reference_ops):
    model = tiny(family)
    ids, mask = left_padded([6, 3], 6)
    expected = hf_generate(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0)[:, 6:]
    store, results = torch.distributed.HashStore(), {}

    def rank(index: int) -> None:
        try:
            group = torch.distributed.ProcessGroupGloo(store, index, 2, datetime.timedelta(seconds=60))
            engine = DecoderEngine(model, tp_rank=index, tp_size=2, process_group=group)
            engine.reserve(2, 10)
            with torch.no_grad():
                first_logits = engine.prefill(ids, mask.bool())
            results[index] = (engine.local_heads, decode_loop(engine.step, first_logits, max_new_tokens=4))
        except Exception as error:  # reported by the main thread
            results[index] = error

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index in range(2):
        assert not isinstance(results[index], Exception), results[index]
        local_heads, tokens = results[index]
        assert local_heads == 2  # of 4
        assert torch.equal(tokens, expected)

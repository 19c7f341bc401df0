"""T5 generation (tritonize.generation.t5) vs HF T5ForConditionalGeneration: encoder states, decoder logits
step by step, and greedy tokens identical to HF `generate` (fp32 on CPU; bf16 agreement on a GPU)."""

import pytest
import torch
import transformers
from helpers import KernelLaunches, assert_close

import tritonize
from tritonize import ops
from tritonize.generation.t5 import ENGINE_ATTRIBUTE, T5Engine, generate_t5
from tritonize.kernels.common import INTERPRETED

FEED_FORWARDS = ("relu", "gated-gelu")


def tiny_t5(feed_forward_proj: str, dtype=torch.float32, device="cpu", **sizes) -> torch.nn.Module:
    """A random T5 (HF's initialization) with an untied random lm_head and norm weights near 1: with the
    lm_head tied to the embeddings, a random T5 keeps predicting its input token."""
    config = transformers.T5Config(
        **(dict(d_model=64, d_kv=16, num_heads=4, num_layers=2, d_ff=128, vocab_size=101) | sizes),
        feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=feed_forward_proj == "relu",  # v1.0 scales the decoder output, v1.1 / flan do not
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    model.generation_config.eos_token_id = None  # no eos unless a test names one
    return model.to(device=device, dtype=dtype)


def padded_batch(lengths: list[int], vocab: int = 101, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (no pad or eos among the real tokens) and their attention_mask."""
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = torch.randint(2, vocab, mask.shape).masked_fill(mask == 0, 0)
    return input_ids.to(device), mask.to(device)


def hf_generate(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)


@pytest.fixture
def reference_ops(monkeypatch):
    """Runs tritonize ops through their PyTorch references: long decodes stay fast on CPU (the kernels
    themselves run through the Triton interpreter in the tests without this fixture, and in their own tests)."""
    monkeypatch.setattr(ops, "INTERPRETED", False)


# -- through the Triton interpreter ---------------------------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARDS)
def test_encoder_matches_hf(feed_forward_proj):
    model = tiny_t5(feed_forward_proj)
    input_ids, mask = padded_batch([9, 5])
    with torch.no_grad():
        ours = T5Engine(model).encode(input_ids, mask.bool())
        hf = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert_close(ours, hf, scale=10)


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARDS)
def test_decoder_logits_match_teacher_forced_hf(feed_forward_proj):
    model = tiny_t5(feed_forward_proj)
    input_ids, mask = padded_batch([7, 4])
    decoder_input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(2, 101, (2, 3))], dim=1)
    with torch.no_grad():
        hf = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
        engine = T5Engine(model)
        engine.start(input_ids, mask, max_new_tokens=decoder_input_ids.shape[1])
        ours = torch.stack([engine.step(tokens) for tokens in decoder_input_ids.unbind(1)], dim=1)
    assert_close(ours, hf, scale=10)


def test_greedy_padded_batch_matches_hf_through_kernels():
    model = tiny_t5("gated-gelu")
    input_ids, mask = padded_batch([6, 3])
    expected = hf_generate(model, input_ids, mask, max_new_tokens=6)
    assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=6), expected)
    assert torch.equal(tritonize.generate(model, input_ids, mask, max_new_tokens=6), expected)  # routed to T5


@pytest.mark.skipif(not INTERPRETED, reason="records the Triton interpreter's kernel launches")
def test_decoder_steps_compile_nothing_new_for_other_lengths(monkeypatch):
    """The decoder steps of fresh engines for other source and new-token lengths launch every kernel with
    the same specializations (int args divisible by 16 or not, == 1 or not): on a GPU a call compiles nothing
    new, whichever lengths came first. (Unrounded, the lengths 16 and 11 or 5 differ in divisibility.)"""
    model = tiny_t5("gated-gelu")
    launches = KernelLaunches()
    launches.install(monkeypatch)
    monkeypatch.setattr(T5Engine, "step", launches.wrap(T5Engine.step))
    signatures = []
    for lengths, new in (([16, 9], 15), ([11, 5], 4)):
        input_ids, mask = padded_batch(lengths)
        launches.signatures = set()
        if hasattr(model, ENGINE_ATTRIBUTE):
            delattr(model, ENGINE_ATTRIBUTE)  # buffers sized by this call's lengths alone
        generate_t5(model, input_ids, mask, max_new_tokens=new)
        signatures.append(launches.signatures)
    assert signatures[0] and signatures[1] == signatures[0]


# -- through the op references (same engine code, fast) -------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARDS)
@pytest.mark.parametrize("lengths, left_padded", [([11], False), ([11, 4, 8], False), ([11, 4, 8], True)],
                         ids=["single", "right-padded-batch", "left-padded-batch"])
def test_greedy_matches_hf_generate(feed_forward_proj, lengths, left_padded, reference_ops):
    model = tiny_t5(feed_forward_proj)
    input_ids, mask = padded_batch(lengths)
    if left_padded:
        input_ids, mask = input_ids.flip(1), mask.flip(1)
    expected = hf_generate(model, input_ids, mask, max_new_tokens=20)
    ours = generate_t5(model, input_ids, None if len(lengths) == 1 else mask, max_new_tokens=20)
    assert torch.equal(ours, expected)


def eos_seen_early(model, input_ids, mask) -> int:
    """A token that HF's greedy output holds at new position 2 of row 0: used as eos to stop early."""
    return hf_generate(model, input_ids, mask, max_new_tokens=4)[0, 3].item()


def test_eos_stops_and_pads_like_hf(reference_ops):
    model = tiny_t5("gated-gelu")
    input_ids, mask = padded_batch([9, 6, 7])
    eos = eos_seen_early(model, input_ids, mask)
    expected = hf_generate(model, input_ids, mask, max_new_tokens=16, eos_token_id=eos)
    ours = generate_t5(model, input_ids, mask, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(ours, expected)
    assert (ours[0, 4:] == 0).all()  # padded after eos


def test_min_new_tokens_like_hf(reference_ops):
    model = tiny_t5("relu")
    input_ids, mask = padded_batch([8, 5])
    eos = eos_seen_early(model, input_ids, mask)
    expected = hf_generate(model, input_ids, mask, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos)
    ours = generate_t5(model, input_ids, mask, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos)
    assert torch.equal(ours, expected)
    assert (ours[:, 1:7] != eos).all()


def test_defaults_come_from_generation_config(reference_ops):
    model = tiny_t5("relu")
    input_ids, mask = padded_batch([6, 6])
    model.generation_config.eos_token_id = eos_seen_early(model, input_ids, mask)
    assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=10),
                       hf_generate(model, input_ids, mask, max_new_tokens=10))


def test_sampling_with_top_k_1_is_greedy(reference_ops):
    model = tiny_t5("gated-gelu")
    input_ids, mask = padded_batch([7, 5])
    sampled = generate_t5(model, input_ids, mask, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, hf_generate(model, input_ids, mask, max_new_tokens=10))


def test_calls_inside_then_outside_inference_mode(reference_ops):
    """Buffers kept by a call under torch.inference_mode() stay writable for a later call outside it."""
    model = tiny_t5("gated-gelu")
    input_ids, mask = padded_batch([9, 6])
    with torch.inference_mode():
        inside = generate_t5(model, input_ids, mask, max_new_tokens=4)
    outside = generate_t5(model, input_ids, mask, max_new_tokens=4)
    assert torch.equal(inside, outside)
    assert torch.equal(outside, hf_generate(model, input_ids, mask, max_new_tokens=4))


def test_consecutive_calls_match_hf(reference_ops):
    """The engine kept on the model serves call after call: each call gives HF's tokens whatever ran before.
    Call 2 (other prompts and source length, same batch and settings) resets and reuses call 1's loop over
    buffers that still hold call 1's keys past its own lengths; call 3 is a smaller batch; call 4 a larger
    batch and a source longer than the buffers, which grows them and drops the kept loops."""
    model = tiny_t5("gated-gelu")
    input_ids, mask = padded_batch([9, 6, 7])
    eos = eos_seen_early(model, input_ids, mask)  # row 0 of call 1 finishes early
    kept_loops = []
    for index, (lengths, new) in enumerate([([9, 6, 7], 16), ([5, 12, 3], 10), ([4, 8], 20), ([70, 6, 7, 2], 5)]):
        if index:
            input_ids, mask = padded_batch(lengths)
        expected = hf_generate(model, input_ids, mask, max_new_tokens=new, eos_token_id=eos)
        assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=new, eos_token_id=eos), expected)
        engine = getattr(model, ENGINE_ATTRIBUTE)
        kept_loops.append(len(engine.decode_graphs))
        if index == 0:
            first_engine = engine
        assert engine is first_engine
    assert kept_loops == [1, 1, 2, 1]


def test_source_padded_to_its_bucket_gives_the_unpadded_logits(reference_ops):
    """start_and_first_step pads the source on the right to a multiple of 64 with masked positions, in buffers
    kept per (batch, bucket): its first logits and the decoder steps after them are those of `start` on the
    unpadded source and the start token's step, for source lengths on both sides of a bucket edge, batched
    with padding. (generate_t5 runs the same padded path through the kernels in the tests above.)"""
    model = tiny_t5("gated-gelu")
    engine = T5Engine(model)
    engine.reserve(3, 65, 3)  # room for every case: no growth, buckets kept
    kept_buckets = []
    with torch.no_grad():
        for length in (1, 63, 64, 65):
            input_ids, mask = padded_batch([length, max(1, length - 7), 1])
            tokens = torch.randint(2, 101, (3, 2))
            logits = {}
            for bucketed in (False, True):
                if bucketed:
                    first = engine.start_and_first_step(input_ids, mask, 3, start_token=0)
                else:
                    engine.start(input_ids, mask, 3)
                    first = engine.step(torch.zeros(3, dtype=torch.long))
                logits[bucketed] = torch.stack([first.clone()] + [engine.step(t) for t in tokens.unbind(1)])
            assert_close(logits[True], logits[False], scale=10)
            kept_buckets.append(len(engine.start_graphs))
    assert kept_buckets == [1, 1, 1, 2]  # one bucket of 64 (lengths 1 to 64), then one of 128


def test_calls_within_and_across_source_buckets_match_hf(reference_ops):
    """The source buffers serve call after call with HF's tokens. Call 2 has call 1's batch and bucket but
    shorter sources: the same buffers, whose positions call 1 filled must be masked again; call 3 crosses
    into the next bucket, which grows the engine's buffers (the kept buckets are dropped); call 4 is back
    in the first bucket."""
    model = tiny_t5("relu")
    kept_buckets = []
    for lengths in ([63, 40], [5, 1], [65, 64], [64, 1]):
        input_ids, mask = padded_batch(lengths)
        expected = hf_generate(model, input_ids, mask, max_new_tokens=6)
        assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=6), expected)
        kept_buckets.append(len(getattr(model, ENGINE_ATTRIBUTE).start_graphs))
    assert kept_buckets == [1, 1, 1, 2]


def test_engine_is_rebuilt_when_a_parameter_is_replaced(reference_ops):
    model = tiny_t5("relu")
    input_ids, mask = padded_batch([6, 4])
    generate_t5(model, input_ids, mask, max_new_tokens=4)
    engine = getattr(model, ENGINE_ATTRIBUTE)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    expected = hf_generate(model, input_ids, mask, max_new_tokens=4)
    assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=4), expected)
    assert getattr(model, ENGINE_ATTRIBUTE) is not engine  # a graph of the old one would read the old weight


def test_rejects_float16_and_other_models():
    with pytest.raises(TypeError, match="bfloat16"):
        T5Engine(tiny_t5("relu", dtype=torch.float16))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        generate_t5(gpt2, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


# -- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARDS)
def test_t5_small_sizes_on_cuda(feed_forward_proj):
    """T5-small sizes on CUDA (the decode loop in CUDA graphs), one fixed random model per activation.

    fp32: greedy tokens identical to HF's. bf16 as HF loads it (the "wo" projections kept in fp32), stepped
    along the fp32 model's greedy tokens (with random weights one early bf16 difference changes every later
    token, even between HF's own bf16 and fp32 runs): our next token is HF bf16's in >= 95% of the steps and
    the fp32 model's about as often as HF bf16's is. (On CPU with the op references: 97-98%, and 96-97%
    vs HF's 97%.) The CUDA-graph loop gives exactly the tokens of stepping the engine eagerly.
    """
    torch.manual_seed(0)
    sizes = dict(d_model=512, d_kv=64, num_heads=8, num_layers=6, d_ff=2048, vocab_size=32128)
    model = tiny_t5(feed_forward_proj, device="cuda", **sizes)
    input_ids, mask = padded_batch([60, 33, 47, 12], vocab=32128, device="cuda")
    fp32_tokens = hf_generate(model, input_ids, mask, max_new_tokens=48)
    assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=48), fp32_tokens)

    model = model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith(".wo"):
            module.float()
    with torch.inference_mode():
        hf_next = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=fp32_tokens[:, :-1]).logits
        engine = T5Engine(model)
        engine.start(input_ids, mask, max_new_tokens=48)
        our_next = torch.stack([engine.step(tokens) for tokens in fp32_tokens[:, :-1].unbind(1)], dim=1)
        hf_next, our_next, fp32_next = hf_next.argmax(-1), our_next.argmax(-1), fp32_tokens[:, 1:]
    assert (our_next == hf_next).float().mean().item() >= 0.95
    assert (our_next == fp32_next).float().mean().item() >= (hf_next == fp32_next).float().mean().item() - 0.02

    with torch.inference_mode():
        engine = T5Engine(model)
        engine.start(input_ids, mask, max_new_tokens=48)
        eager_tokens = [fp32_tokens[:, 0]]
        for _ in range(48):
            eager_tokens.append(engine.step(eager_tokens[-1]).argmax(-1))
    assert torch.equal(generate_t5(model, input_ids, mask, max_new_tokens=48), torch.stack(eager_tokens, dim=1))


@pytest.mark.gpu
def test_decode_graph_is_kept_across_calls(graph_captures):
    """Calls with the batch and settings of an earlier one replay its graphs (no capture: the decode loop's and
    the start graph of its source bucket), whatever their prompts, source lengths (within a bucket of 64) and
    max_new_tokens within the buffers and token capacity, with the eager loop's tokens; a source longer than
    the buffers grows them and captures both anew."""
    model = tiny_t5("gated-gelu", device="cuda")
    for lengths, new, captures in [([9, 6, 7], 40, 2), ([12, 3, 5], 40, 2), ([9, 6, 7], 25, 2), ([70, 6, 7], 40, 4)]:
        input_ids, mask = padded_batch(lengths, device="cuda")
        graphed = generate_t5(model, input_ids, mask, max_new_tokens=new)
        assert torch.equal(graphed, generate_t5(model, input_ids, mask, max_new_tokens=new, cuda_graph=False))
        assert len(graph_captures) == captures, (lengths, new)
        assert len(getattr(model, ENGINE_ATTRIBUTE).start_graphs) == 1


@pytest.mark.gpu
def test_start_graph_is_kept_across_calls(graph_captures):
    """A source of another length in the same bucket of 64 replays the bucket's kept start graph (encoder,
    cross-attention K/V, the start token's step) without a capture, with the eager start's logits and the
    same decoder steps after it; the next bucket captures one more."""
    model = tiny_t5("relu", device="cuda")
    engine = T5Engine(model)
    engine.reserve(3, 70, 4)
    for lengths, captures in [([9, 6, 7], 1), ([64, 1, 33], 1), ([1, 1, 1], 1), ([65, 3, 70], 2)]:
        input_ids, mask = padded_batch(lengths, device="cuda")
        tokens = torch.randint(2, 101, (3, 4), device="cuda")
        logits = {}
        with torch.no_grad():
            for graph in (True, False):
                first = engine.start_and_first_step(input_ids, mask, 4, start_token=0, cuda_graph=graph)
                logits[graph] = torch.stack([first.clone()] + [engine.step(t) for t in tokens.unbind(1)])
        assert torch.equal(logits[True], logits[False]), lengths
        assert len(graph_captures) == captures and len(engine.start_graphs) == captures, lengths

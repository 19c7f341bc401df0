"""Shape buckets, padding, output slicing and the bucketed runner (CPU; CUDA graphs on the GPU)."""

import gc
import inspect

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tritonize.runtime.buckets import ShapeBuckets, pad_to, unpadded_outputs
from tritonize.runtime.cuda_graphs import BucketedRunner, cyclic_gc_paused


def test_power_of_two_buckets_and_fit():
    buckets = ShapeBuckets.powers_of_two(max_seq_len=512, max_batch=8)
    assert buckets.batch == (1, 2, 4, 8) and buckets.seq == (16, 32, 64, 128, 256, 512)
    assert buckets.fit(3, 17) == (4, 32)
    assert buckets.fit(1, 1) == (1, 16)
    assert buckets.fit(8, 512) == (8, 512)
    with pytest.raises(ValueError, match="sequence length 513"):
        buckets.fit(1, 513)
    with pytest.raises(ValueError, match="batch 9"):
        buckets.fit(9, 10)
    assert ShapeBuckets.powers_of_two(max_seq_len=100).seq == (16, 32, 64, 100)


def test_user_buckets_are_checked():
    assert ShapeBuckets.from_user({"seq": [128, 8]}, 512).seq == (8, 128)
    with pytest.raises(ValueError, match="keys"):
        ShapeBuckets.from_user({"sequence": [8]}, 512)
    with pytest.raises(ValueError, match="maximum length"):
        ShapeBuckets.from_user({"seq": [1024]}, 512)


def test_pad_and_slice_round_trip():
    ids = torch.randint(1, 100, (3, 5))
    padded = pad_to(ids, 4, 16)
    assert padded.shape == (4, 16) and torch.equal(padded[:3, :5], ids) and padded[3:].eq(0).all()
    assert padded[:, 5:].eq(0).all()
    hidden = torch.randn(4, 16, 8)
    pooled = torch.randn(4, 16)  # a per-sequence 2-D output whose width happens to equal the padded seq
    out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    sliced = unpadded_outputs(out, (3, 5), (4, 16))
    assert isinstance(sliced, BaseModelOutputWithPooling)
    assert sliced.last_hidden_state.shape == (3, 5, 8) and sliced.pooler_output.shape == (3, 16)
    assert sliced.last_hidden_state.data_ptr() == hidden.data_ptr()  # views without copy
    start_logits = unpadded_outputs({"start_logits": torch.randn(4, 16)}, (3, 5), (4, 16))["start_logits"]
    assert start_logits.shape == (3, 5)
    copied = unpadded_outputs(out, (3, 5), (4, 16), copy=True)
    assert copied.last_hidden_state.shape == (3, 5, 8) and copied.pooler_output.shape == (3, 16)
    assert torch.equal(copied.last_hidden_state, hidden[:3, :5]) and torch.equal(copied.pooler_output, pooled[:3])
    assert copied.last_hidden_state.data_ptr() != hidden.data_ptr()
    assert unpadded_outputs(out, (4, 16), (4, 16)) is out  # nothing to cut, nothing to copy: the same object


def test_copied_outputs_copy_every_tensor_of_a_nested_output():
    hidden, pooled, extra = torch.randn(2, 5, 8), torch.randn(2, 8, dtype=torch.float64), torch.arange(6)[::2]
    out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled,
                                     hidden_states=(hidden[:, :3], [extra, "not a tensor"]))
    copied = unpadded_outputs(out, (2, 5), (2, 5), copy=True)
    assert isinstance(copied, BaseModelOutputWithPooling) and isinstance(copied.hidden_states[1], list)
    assert copied.hidden_states[1][1] == "not a tensor"
    pairs = [(copied.last_hidden_state, hidden), (copied.pooler_output, pooled),
             (copied.hidden_states[0], hidden[:, :3]), (copied.hidden_states[1][0], extra)]
    for copy, original in pairs:
        assert copy.dtype == original.dtype and torch.equal(copy, original)
    before = [copy.clone() for copy, _ in pairs]
    for _, original in pairs:
        original.fill_(7)  # the caller's copies must not change when the graph's buffers do
    assert all(torch.equal(copy, kept) for (copy, _), kept in zip(pairs, before, strict=True))


class MaskedMean(torch.nn.Module):
    """A tiny model with an attention mask: mean of the embedded real tokens, per token output too."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids, attention_mask=None, scale=1.0):
        h = self.embed(input_ids) * scale
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"hidden": h * m, "mean": (h * m).sum(1) / m.sum(1)}


def make_runner(model, calls, device="cpu", cuda_graphs=False, verify=None):
    def compiled(**kwargs):
        calls.append({k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return model.forward(**kwargs)

    return BucketedRunner(compiled, model.forward, inspect.signature(model.forward),
                          ShapeBuckets.powers_of_two(64, 8), cuda_graphs=cuda_graphs, copy_outputs=True,
                          verify=verify, mask_name="attention_mask", device=torch.device(device))


def test_runner_pads_masks_and_slices():
    model, calls = MaskedMean(), []
    runner = make_runner(model, calls)
    ids = torch.randint(1, 50, (3, 7))
    out = runner(ids, scale=2.0)  # no mask given: one is made for the real tokens
    expected = model(ids, torch.ones_like(ids), scale=2.0)
    assert calls[-1] == {"input_ids": (4, 16), "attention_mask": (4, 16)}
    torch.testing.assert_close(out["hidden"], expected["hidden"])
    torch.testing.assert_close(out["mean"], expected["mean"])


def test_runner_rejects_bad_inputs():
    runner = make_runner(MaskedMean(), [])
    with pytest.raises(ValueError, match="exceeds the largest sequence bucket"):
        runner(torch.randint(1, 50, (1, 65)))
    with pytest.raises(ValueError, match="is not \\[batch, seq"):
        runner(torch.randint(1, 50, (2, 7)), torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="is on meta"):
        runner(torch.randint(1, 50, (2, 7), device="meta"))


class WithVariadics(MaskedMean):
    def forward(self, input_ids, attention_mask=None, *args, scale=1.0, **kwargs):
        return super().forward(input_ids, attention_mask, scale=scale * kwargs.get("extra", 1.0))


def test_runner_binds_arguments_as_the_forward_does():
    """By name (the fast path), by position, an extra keyword caught by **kwargs, and *args refused; a call the
    forward cannot take is its TypeError."""
    model, calls = WithVariadics(), []
    runner = make_runner(model, calls)
    ids, mask = torch.randint(1, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    expected = model(ids, mask, scale=2.0, extra=3.0)["hidden"]
    for out in (runner(input_ids=ids, attention_mask=mask, scale=6.0), runner(ids, mask, scale=6.0),
                runner(ids, attention_mask=mask, scale=2.0, extra=3.0)):
        torch.testing.assert_close(out["hidden"], expected)
    assert calls[-1] == {"input_ids": (2, 16), "attention_mask": (2, 16)}
    with pytest.raises(ValueError, match="not through \\*args"):
        runner(ids, mask, ids)
    with pytest.raises(TypeError, match="missing a required argument: 'input_ids'"):
        runner(input_idz=ids)
    with pytest.raises(TypeError, match="missing a required argument: 'input_ids'"):
        runner(attention_mask=mask)  # by name, but short of a required one


def test_runner_verifies_first_call_of_each_bucket():
    seen = []
    runner = make_runner(MaskedMean(), [], verify=lambda inputs, out: seen.append(tuple(inputs["input_ids"].shape)))
    for shape in [(2, 7), (2, 9), (1, 20), (2, 5)]:
        runner(torch.randint(1, 50, shape))
    assert seen == [(2, 7), (1, 20)]  # (2, 9) and (2, 5) share the (2, 16) bucket


def test_cyclic_gc_is_paused_for_a_new_bucket_only():
    """A new bucket's first call (compile, capture) runs with the cyclic collector off; later calls of that bucket
    with it on; a collector the caller turned off stays off."""
    model, seen = MaskedMean(), []
    runner = make_runner(model, [])
    compiled = runner.compiled

    def recording(**kwargs):
        seen.append(gc.isenabled())
        return compiled(**kwargs)

    runner.compiled = recording
    assert gc.isenabled()
    for shape in [(2, 7), (2, 9), (1, 20)]:
        runner(torch.randint(1, 50, shape))
    assert seen == [False, True, False] and gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("a failing warm-up")
    assert gc.isenabled()


@pytest.mark.gpu
def test_cuda_graph_runner_replays_and_outputs_survive():
    model, calls = MaskedMean().cuda(), []
    runner = make_runner(model, calls, device="cuda", cuda_graphs=True)
    first_ids = torch.randint(1, 50, (2, 7), device="cuda")
    first = runner(first_ids)
    n_calls = len(calls)
    second = runner(torch.randint(1, 50, (2, 9), device="cuda"))  # same bucket: a replay, no new call
    assert len(calls) == n_calls and runner.captures == 1
    expected = model(first_ids, torch.ones_like(first_ids))
    torch.testing.assert_close(first["hidden"], expected["hidden"])  # not overwritten by the replay
    assert second["hidden"].shape == (2, 9, 8)

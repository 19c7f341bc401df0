"""The packed QKV projection with rotary and the KV-cache write in its epilogue (gemv.py's QKV mode, public as
ops.qkv_rotary_cache_write) against the fp64 reference: both rotation styles, partial rotary, GQA, bias, no
rotation (GPT-2), batch 1 and 2, offsets per sequence (one past the cache), NaN-poisoned outputs; the same bits
as the unfused kernels; the decode step of the engine takes it."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, poisoned

import tritonize.ops
from tritonize.debug import bounds_checked
from tritonize.kernels import gemv, reference
from tritonize.kernels.common import INTERPRETED
from tritonize.kernels.gemv import GEMV_MAX_M, GemvConfig, qkv_rotary_cache_write_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROTATIONS = ("half", "interleaved", None)  # Llama / NeoX, GPT-J, none (GPT-2)


def _projection(batch, heads, kv_heads, head_dim, hidden, dtype, device, *, bias=True):
    """x [batch, 1, hidden] far from unit RMS, a packed weight [(heads + 2 * kv_heads) * head_dim, hidden], its
    bias (or None) and an RMSNorm weight."""
    rows = (heads + 2 * kv_heads) * head_dim
    x = (torch.randn(batch, 1, hidden, device=device) * 3 + 1).to(dtype)
    weight = (torch.randn(rows, hidden, device=device) / hidden**0.5).to(dtype)
    return (x, weight, torch.randn(rows, device=device).to(dtype) if bias else None,
            (torch.rand(hidden, device=device) + 0.5).to(dtype))


def _cos_sin(batch, rotary_dim, rotation, device, dtype):
    """HF-style cos/sin [batch, 1, rotary_dim] at random positions (Llama's cat(freqs, freqs), GPT-J's frequencies
    repeated per pair), or (None, None)."""
    if rotation is None:
        return None, None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    freqs = torch.randint(0, 4096, (batch, 1, 1), device=device).float() * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if rotation == "interleaved" else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _caches(batch, kv_heads, cache_len, head_dim, offsets, dtype, device):
    """Random k and v caches [batch + 1, kv_heads, cache_len, head_dim], NaN at each sequence's write position
    inside the cache (a missed write fails), and the bool mask of those positions."""
    targets = torch.zeros(batch + 1, 1, cache_len, 1, dtype=torch.bool)
    for b, position in enumerate(offsets.tolist()):
        if 0 <= position < cache_len:
            targets[b, 0, position] = True
    targets = targets.expand(batch + 1, kv_heads, cache_len, head_dim).to(device)
    shape = (batch + 1, kv_heads, cache_len, head_dim)
    return *(torch.randn(shape, device=device).to(dtype).masked_fill(targets, float("nan")) for _ in range(2)), targets


def _check(x, weight, bias, norm_weight, cos, sin, kv_heads, head_dim, cache_len, offsets, rotation, config=None):
    """qkv_rotary_cache_write_fwd against the fp64 reference: q into a NaN-poisoned buffer, the written cache
    positions close to the reference, every other position unchanged."""
    batch, _, hidden = x.shape
    heads = weight.shape[0] // head_dim - 2 * kv_heads
    k_cache, v_cache, targets = _caches(batch, kv_heads, cache_len, head_dim, offsets, x.dtype, x.device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = poisoned((batch, heads, 1, head_dim), x.dtype, x.device)
    got = qkv_rotary_cache_write_fwd(
        x.view(batch, hidden), weight, bias, cos, sin, k_cache, v_cache, offsets, rotation == "interleaved",
        rms_norm_weight=norm_weight, rms_norm_eps=1e-5, q_out=q_out, config=config,
    )  # fmt: skip
    k_ref, v_ref = k_before.double(), v_before.double()
    q_ref = reference.qkv_rotary_cache_write(
        x.double(), weight.double(), None if bias is None else bias.double(),
        None if cos is None else cos.double(), None if sin is None else sin.double(), k_ref, v_ref, offsets,
        rotation == "interleaved", None if norm_weight is None else norm_weight.double(), 1e-5,
    )  # fmt: skip
    assert got is q_out
    assert_close(q_out, q_ref, x.dtype)
    assert_close(k_cache[targets], k_ref[targets], x.dtype)
    assert_close(v_cache[targets], v_ref[targets], x.dtype)
    assert torch.equal(k_cache[~targets], k_before[~targets]) and torch.equal(v_cache[~targets], v_before[~targets])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("batch", list(range(1, GEMV_MAX_M + 1)))
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(40, 40), (24, 16)])
def test_layouts(dtype, rotation, batch, head_dim, rotary_dim, device):
    """3 heads and 1 kv head (GQA), full and partial rotary (head_dim 24, rotary_dim 16: pass-through dims), bias,
    the norm prologue, an odd cache length, each sequence at its own position."""
    x, weight, bias, norm_weight = _projection(batch, 3, 1, head_dim, 72, dtype, device)
    cos, sin = _cos_sin(batch, rotary_dim, rotation, device, dtype)
    offsets = torch.tensor([6, 2][:batch], dtype=torch.int32, device=device)
    _check(x, weight, bias, norm_weight, cos, sin, 1, head_dim, 7, offsets, rotation)


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_no_bias_no_norm_shared_cos_int64_small_blocks(rotation, device):
    """No bias, no norm (GPT-2's LayerNorm runs before), cos/sin shared by both rows, int64 offsets, 2 kv heads,
    blocks of 4 columns (the GPU's: pairs of one program from two heads) over several K steps."""
    x, weight, _, _ = _projection(2, 2, 2, 16, 100, torch.float32, device)
    cos, sin = _cos_sin(1, 8, rotation, device, torch.float32)
    offsets = torch.tensor([0, 4], dtype=torch.int64, device=device)
    _check(x, weight, None, None, cos, sin, 2, 16, 5, offsets, rotation, GemvConfig(block_n=4, block_k=32))


def test_write_past_the_cache_is_skipped(device):
    """An offset past the cache's end and a negative one write nothing there (and nothing out of bounds); q is
    still computed for every row."""
    x, weight, bias, norm_weight = _projection(2, 3, 1, 24, 40, torch.float32, device)
    cos, sin = _cos_sin(2, 24, "half", device, torch.float32)
    for offsets in ([5, 3], [-1, 2]):
        offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        with bounds_checked() if INTERPRETED else contextlib.nullcontext():
            _check(x, weight, bias, norm_weight, cos, sin, 1, 24, 5, offsets, "half")


def _engine_like_call(dtype, rotation, batch, device, *, heads=4, kv_heads=2, head_dim=16):
    """ops.qkv_rotary_cache_write's arguments at a Llama-like decode step (zeroed caches), as a dict."""
    x, weight, bias, norm_weight = _projection(batch, heads, kv_heads, head_dim, 64, dtype, device)
    cos, sin = _cos_sin(batch, head_dim, rotation, device, dtype)
    caches = [torch.zeros(batch, kv_heads, 9, head_dim, dtype=dtype, device=device) for _ in range(2)]
    return dict(x=x, weight=weight, bias=bias, cos=cos, sin=sin, k_cache=caches[0], v_cache=caches[1],
                write_offsets=torch.tensor([3, 8][:batch], dtype=torch.int32, device=device),
                norm_weight=norm_weight, interleaved=rotation == "interleaved")


def _call(args):
    args = {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}
    q = tritonize.ops.qkv_rotary_cache_write(**args)
    return q, args["k_cache"], args["v_cache"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rotation", ROTATIONS)
def test_same_bits_as_the_unfused_kernels(dtype, rotation, monkeypatch, device):
    """The fused kernel rounds the projection to the dtype before rotating, as the unfused GEMV stores it: q and the
    caches equal the engine's unfused path's (rms_norm_linear's GEMV, then rotary_cache_write) bit for bit. (Not
    bf16 on CPU: the interpreter's plain GEMV truncates to bf16 where the fused epilogue and every GPU round.)"""
    args = _engine_like_call(dtype, rotation, 2, device)
    launches = []
    monkeypatch.setattr(gemv, "qkv_rotary_cache_write_fwd", _counted(gemv.qkv_rotary_cache_write_fwd, launches))
    fused = _call(args)
    assert len(launches) == 1
    assert fused[0].is_contiguous() and fused[0].shape == (2, 4, 1, 16)

    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    qkv = tritonize.ops.rms_norm_linear(args["x"], args["norm_weight"], args["weight"], args["bias"], eps=1e-6)
    q, k, v = qkv.view(2, 1, 8, 16).transpose(1, 2).split([4, 2, 2], dim=1)
    q = tritonize.ops.rotary_cache_write(q, k, v, args["cos"], args["sin"], k_cache, v_cache, args["write_offsets"],
                                         interleaved=args["interleaved"])
    for got, want in zip(fused, (q, k_cache, v_cache), strict=True):
        assert torch.equal(got, want)


def test_weight_past_the_cards_limit_takes_the_unfused_kernels(monkeypatch, device):
    """gemv.preferred refusing the weight (past the card's MAX_WEIGHT_BYTES): rms_norm, the tiled projection and
    rotary_cache_write, the same result."""
    args = _engine_like_call(torch.float32, "half", 2, device)
    fused = _call(args)
    launches = []
    monkeypatch.setattr(gemv, "qkv_rotary_cache_write_fwd", _counted(gemv.qkv_rotary_cache_write_fwd, launches))
    monkeypatch.setattr(gemv, "preferred", lambda x, weight: False)
    unfused = _call(args)
    assert not launches
    for got, want in zip(unfused, fused, strict=True):
        assert_close(got, want.double())


def _counted(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize(("batch", "seq", "head_dim", "rotation"),
                         [(GEMV_MAX_M + 1, 1, 16, "half"), (2, 3, 16, "interleaved"), (2, 1, 15, None),
                          (GEMV_MAX_M + 1, 1, 16, None)])
def test_other_sizes_take_the_unfused_kernels(batch, seq, head_dim, rotation, monkeypatch, device):
    """More rows than the GEMV takes, several tokens a sequence (prefill) or an odd head_dim: the two kernels,
    same result as the reference; q contiguous in every case."""
    x = torch.randn(batch, seq, 48, device=device)
    weight = torch.randn((3 + 2) * head_dim, 48, device=device) / 7
    cos, sin = _cos_sin(batch, head_dim, rotation, device, torch.float32)
    if cos is not None:
        cos, sin = cos.expand(batch, seq, head_dim).contiguous(), sin.expand(batch, seq, head_dim).contiguous()
    k_cache, v_cache = (torch.zeros(batch, 1, 8, head_dim, device=device) for _ in range(2))
    offsets = torch.tensor([0, 5, 1][:batch], dtype=torch.int32, device=device)
    launches = []
    monkeypatch.setattr(gemv, "qkv_rotary_cache_write_fwd", _counted(gemv.qkv_rotary_cache_write_fwd, launches))
    q = tritonize.ops.qkv_rotary_cache_write(x, weight, None, cos, sin, k_cache, v_cache, offsets,
                                             interleaved=rotation == "interleaved")
    assert not launches
    k_ref, v_ref = k_cache.double().zero_(), v_cache.double().zero_()
    q_ref = reference.qkv_rotary_cache_write(x.double(), weight.double(), None, None if cos is None else cos.double(),
                                             None if sin is None else sin.double(), k_ref, v_ref, offsets,
                                             rotation == "interleaved")
    assert q.is_contiguous()
    assert_close(q, q_ref)
    assert_close(k_cache, k_ref)
    assert_close(v_cache, v_ref)


@pytest.mark.parametrize("rotation", ["half", None])
def test_reference_path_off_triton(rotation, monkeypatch, device):
    """Tensors that do not run Triton take reference.qkv_rotary_cache_write; q contiguous there too."""
    args = _engine_like_call(torch.float32, rotation, 2, device)
    fused = _call(args)
    monkeypatch.setattr(tritonize.ops, "_runs_triton", lambda t: False)
    on_reference = _call(args)
    assert on_reference[0].is_contiguous()
    for got, want in zip(fused, on_reference, strict=True):
        assert_close(got, want.double())


def test_opcheck(device):
    args = _engine_like_call(torch.float32, "half", 2, device)
    op = torch.ops.tritonize.qkv_rotary_cache_write.default
    order = ("x", "norm_weight", "weight", "bias", "cos", "sin", "k_cache", "v_cache", "write_offsets")
    values = {name: args[name] for name in order}
    torch.library.opcheck(op, (*list(values.values())[:2], 1e-6, *list(values.values())[2:], False))
    values.update(cos=None, sin=None, bias=None, norm_weight=None)
    torch.library.opcheck(op, (*list(values.values())[:2], 1e-6, *list(values.values())[2:], False))


BAD_INPUTS = {  # name: (change to _engine_like_call's arguments, error, words in the message)
    "x_2d": (lambda a: {**a, "x": a["x"][:, 0]}, ValueError, "x must have 3 dims"),
    "rows_not_heads": (lambda a: {**a, "weight": a["weight"][:-3], "bias": a["bias"][:-3]}, ValueError,
                       "packed QKV weight"),
    "no_q_heads": (lambda a: {**a, "weight": a["weight"][:64], "bias": a["bias"][:64]}, ValueError,
                   "heads >= 1"),
    "weight_features": (lambda a: {**a, "weight": a["weight"][:, :32]}, ValueError, "features"),
    "bias_shape": (lambda a: {**a, "bias": a["bias"][:8]}, ValueError, "bias must have shape"),
    "norm_weight_shape": (lambda a: {**a, "norm_weight": a["norm_weight"][:8]}, ValueError, "norm_weight must have"),
    "cache_dtype": (lambda a: {**a, "k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half()}, TypeError,
                    "k_cache has dtype"),
    "cache_batch": (lambda a: {**a, "k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]}, ValueError,
                    "cannot hold"),
    "caches_differ": (lambda a: {**a, "v_cache": a["v_cache"][:, :, :5]}, ValueError, "same shape"),
    "cache_3d": (lambda a: {**a, "k_cache": a["k_cache"][0]}, ValueError, "k_cache must have 4 dims"),
    "offsets_batch": (lambda a: {**a, "write_offsets": a["write_offsets"][:1]}, ValueError, "write_offsets must have"),
    "offsets_float": (lambda a: {**a, "write_offsets": a["write_offsets"].float()}, TypeError, "int32 or int64"),
    "cos_only": (lambda a: {**a, "sin": None}, ValueError, "both be tensors, or both None"),
    "cos_seq": (lambda a: {**a, "cos": a["cos"].expand(2, 2, 16), "sin": a["sin"].expand(2, 2, 16)}, ValueError,
                "cos/sin must have shape"),
    "rotary_dim_odd": (lambda a: {**a, "cos": a["cos"][..., :7], "sin": a["sin"][..., :7]}, ValueError, "rotary_dim"),
    "interleaved": (lambda a: {**a, "interleaved": 1}, TypeError, "interleaved must be a bool"),
    "eps": (lambda a: {**a, "eps": -1.0}, ValueError, "eps"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case, device):
    change, error, words = BAD_INPUTS[case]
    with pytest.raises(error, match=words):
        tritonize.ops.qkv_rotary_cache_write(**change(_engine_like_call(torch.float32, "half", 2, device)))


def test_kernel_entry_refuses_what_it_cannot_fuse(device):
    args = _engine_like_call(torch.float32, "half", 2, device)
    x2d = args["x"][:, 0]
    call = (args["weight"], None, args["cos"], args["sin"], args["k_cache"], args["v_cache"], args["write_offsets"],
            False)
    with pytest.raises(ValueError, match="even block_n"):
        qkv_rotary_cache_write_fwd(x2d, *call, config=GemvConfig(block_n=1, block_k=64))
    with pytest.raises(ValueError, match="at most"):
        qkv_rotary_cache_write_fwd(torch.randn(GEMV_MAX_M + 1, 64, device=device), *call)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", list(range(1, GEMV_MAX_M + 1)))
def test_llama_shapes_gpu(batch):
    """The 1.7 GB Llama's attention input in bf16 (32 heads, 8 kv heads of 64 dims: qkv [3072, 2048]), the shipped
    config, a long cache."""
    x, weight, bias, norm_weight = _projection(batch, 32, 8, 64, 2048, torch.bfloat16, "cuda", bias=False)
    cos, sin = _cos_sin(batch, 64, "half", "cuda", torch.bfloat16)
    offsets = torch.tensor([1000, 37][:batch], dtype=torch.int32, device="cuda")
    _check(x, weight, None, norm_weight, cos, sin, 8, 64, 2048, offsets, "half")


def test_ab_script_arguments():
    """benchmarks/ab_decode_qkv_epilogue.py: batches 1 and 2 and decode rates by default; a batch the fusion does not
    cover, a repeated one or no rounds are refused."""
    benchmarks = str(Path(__file__).parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import ab_decode_qkv_epilogue as ab
    finally:
        sys.path.remove(benchmarks)
    args = ab.parse_args(["--out", "results"])
    assert (args.config, args.batch, args.rounds, args.generate) == ("llama-1.7gb", [1, 2], 3, True)
    assert args.out == "results"
    args = ab.parse_args(["--batch", "2", "--no-generate", "--config", "tiny"])
    assert (args.batch, args.generate, args.config) == ([2], False, "tiny")
    for bad in (["--batch", str(GEMV_MAX_M + 1)], ["--batch", "1", "1"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            ab.parse_args(bad)

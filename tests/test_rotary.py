"""Rotary embeddings (half-rotation and interleaved, partial rotary, GQA, packed views) against the fp64 reference,
alone and fused with the KV-cache write (rotary_cache_write)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_close, poisoned

import tritonize.ops
from tritonize.debug import bounds_checked
from tritonize.kernels import reference
from tritonize.kernels.common import INTERPRETED
from tritonize.kernels.rotary import RotaryConfig, rotary_cache_write_fwd, rotary_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cos_sin(batch, seq, rotary_dim, interleaved, device, dtype=torch.float32):
    """HF-style tables at random positions: Llama's cat(freqs, freqs), or GPT-J's frequencies repeated per pair."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    positions = torch.randint(0, 4096, (batch, seq), device=device).float()
    freqs = positions[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _packed_qk(batch, heads, kv_heads, seq, head_dim, dtype, device):
    """q and k as strided views of a packed [batch, seq, heads + 2 * kv_heads, head_dim] qkv projection."""
    qkv = torch.randn(batch, seq, heads + 2 * kv_heads, head_dim, device=device).to(dtype).transpose(1, 2)
    return qkv[:, :heads], qkv[:, heads : heads + kv_heads]


def _reference(q, k, cos, sin, interleaved):
    return reference.rotary(q.double(), k.double(), cos.double(), sin.double(), interleaved)


def _check(q, k, cos, sin, interleaved, config=None):
    """rotary_fwd into NaN-poisoned buffers, compared with the fp64 reference."""
    out = (poisoned(q.shape, q.dtype, q.device), poisoned(k.shape, k.dtype, k.device))
    q_rot, k_rot = rotary_fwd(q, k, cos, sin, interleaved, out=out, config=config)
    assert q_rot is out[0] and k_rot is out[1]
    q_ref, k_ref = _reference(q, k, cos, sin, interleaved)
    assert_close(q_rot, q_ref, q.dtype)
    assert_close(k_rot, k_ref, k.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (80, 32)])
@pytest.mark.parametrize("seq, cos_batch", [(1, 2), (33, 1)])
def test_layouts(dtype, interleaved, head_dim, rotary_dim, seq, cos_batch, device):
    """Packed views, GQA k (4 heads, 2 kv heads), partial rotary, cos/sin per batch or broadcast."""
    q, k = _packed_qk(2, 4, 2, seq, head_dim, dtype, device)
    cos, sin = _cos_sin(cos_batch, seq, rotary_dim, interleaved, device, dtype)
    _check(q, k, cos, sin, interleaved)


def test_passthrough_and_norm(device):
    """Dims past rotary_dim are copied bit for bit; each rotated pair keeps its length."""
    q, k = _packed_qk(1, 3, 1, 9, 80, torch.float32, device)
    cos, sin = _cos_sin(1, 9, 32, False, device)
    q_rot, k_rot = tritonize.ops.rotary(q, k, cos, sin)
    assert torch.equal(q_rot[..., 32:], q[..., 32:]) and torch.equal(k_rot[..., 32:], k[..., 32:])
    torch.testing.assert_close(q_rot[..., :16] ** 2 + q_rot[..., 16:32] ** 2, q[..., :16] ** 2 + q[..., 16:32] ** 2)


def test_matches_transformers(device):
    """The same numbers as HF's Llama (half) and GPT-J (interleaved) functions, computed in fp64."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    q, k = _packed_qk(2, 4, 2, 7, 64, torch.float64, device)
    cos, sin = _cos_sin(2, 7, 64, False, device, torch.float64)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_ref, k_ref = reference.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_ref, q_hf)
    torch.testing.assert_close(k_ref, k_hf)
    # GPT-J: x [batch, seq, heads, rotary_dim], its cos/sin [batch, seq, rotary_dim / 2]
    cos_j, sin_j = cos[..., :32], sin[..., :32]
    q_j = gptj.apply_rotary_pos_emb(q.transpose(1, 2), sin_j, cos_j).transpose(1, 2)
    q_ref, _ = reference.rotary(q, k, cos_j.repeat_interleave(2, -1), sin_j.repeat_interleave(2, -1), True)
    torch.testing.assert_close(q_ref, q_j)
    q32, k32 = q.float(), k.float()
    q_ours, k_ours = tritonize.ops.rotary(q32, k32, cos.float(), sin.float())
    assert_close(q_ours, q_hf, torch.float32)
    assert_close(k_ours, k_hf, torch.float32)


@pytest.mark.parametrize("rows_per_program", [1, 8])
def test_small_programs(rows_per_program, device):
    """Many programs: the q/k boundary falls inside the grid and the last blocks are partial."""
    q, k = _packed_qk(1, 3, 1, 5, 64, torch.float16, device)
    cos, sin = _cos_sin(1, 5, 48, True, device, torch.float16)
    _check(q, k, cos, sin, True, RotaryConfig(rows_per_program))


def test_contiguous_and_cos_dtype(device):
    """Contiguous q/k, fp32 cos/sin with bf16 q/k (the tables may be wider than the activations)."""
    q = torch.randn(2, 8, 17, 64, device=device).to(torch.bfloat16)
    k = torch.randn(2, 1, 17, 64, device=device).to(torch.bfloat16)
    cos, sin = _cos_sin(2, 17, 64, False, device)
    q_rot, k_rot = tritonize.ops.rotary(q, k, cos, sin)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    q_ref, k_ref = _reference(q, k, cos, sin, False)
    assert_close(q_rot, q_ref)
    assert_close(k_rot, k_ref)


def test_empty(device):
    q, k = torch.randn(2, 4, 0, 64, device=device), torch.randn(2, 2, 0, 64, device=device)
    cos, sin = _cos_sin(1, 0, 64, False, device)
    q_rot, k_rot = tritonize.ops.rotary(q, k, cos, sin)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape


BAD_INPUTS = {  # name: (error, call given q [2, 4, 5, 16], k [2, 2, 5, 16], cos and sin [1, 5, 16], fp32)
    "q_3d": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q[0], k, c, s)),
    "q_int": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q.int(), k, c, s)),
    "q_float64": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q.double(), k.double(), c, s)),
    "k_dtype": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q, k.half(), c, s)),
    "k_not_tensor": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q, k.tolist(), c, s)),
    "k_head_dim": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k[..., :8], c, s)),
    "k_seq": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k[:, :, :4], c, s)),
    "k_batch": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k[:1], c, s)),
    "sin_dtype": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c, s.half())),
    "cos_4d": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c[None], s[None])),
    "cos_sin_shapes": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c, s[..., :8])),
    "cos_seq": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c[:, :4], s[:, :4])),
    "cos_batch": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c.expand(3, 5, 16), s.expand(3, 5, 16))),
    "rotary_dim_odd": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c[..., :7], s[..., :7])),
    "rotary_dim_too_big": (ValueError, lambda q, k, c, s: tritonize.ops.rotary(q[..., :8], k[..., :8], c, s)),
    "interleaved": (TypeError, lambda q, k, c, s: tritonize.ops.rotary(q, k, c, s, interleaved="yes")),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case, device):
    error, call = BAD_INPUTS[case]
    q, k = torch.randn(2, 4, 5, 16, device=device), torch.randn(2, 2, 5, 16, device=device)
    cos, sin = _cos_sin(1, 5, 16, False, device)
    with pytest.raises(error):
        call(q, k, cos, sin)


def test_opcheck(device):
    q, k = _packed_qk(1, 2, 1, 3, 16, torch.float32, device)
    cos, sin = _cos_sin(1, 3, 8, True, device)
    torch.library.opcheck(torch.ops.tritonize.rotary.default, (q, k, cos, sin, True))
    torch.library.opcheck(torch.ops.tritonize.rotary.default, (q.contiguous(), k.contiguous(), cos, sin, False))


def test_torch_compile_fullgraph(device):
    q, k = _packed_qk(1, 2, 1, 3, 16, torch.float32, device)
    cos, sin = _cos_sin(1, 3, 16, False, device)

    @torch.compile(backend="eager", fullgraph=True)
    def f(q, k, cos, sin):
        q_rot, k_rot = tritonize.ops.rotary(q, k, cos, sin)
        return q_rot * 2, k_rot + 1

    q_ref, k_ref = _reference(q, k, cos, sin, False)
    q_out, k_out = f(q, k, cos, sin)
    assert_close(q_out, q_ref * 2)
    assert_close(k_out, k_ref + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_real_sizes(dtype, interleaved, device):
    """Llama-1B attention at batch 8, seq 2048: 32 heads, 8 kv heads, head_dim 64."""
    q, k = _packed_qk(8, 32, 8, 2048, 64, dtype, device)
    cos, sin = _cos_sin(8, 2048, 64, interleaved, device, dtype)
    _check(q, k, cos, sin, interleaved)


# -- rotary_cache_write: rotary fused with the KV-cache write ------------------------------------------------------


def _packed_qkv(batch, heads, kv_heads, seq, head_dim, dtype, device):
    """q, k and v as strided views of a packed [batch, seq, heads + 2 * kv_heads, head_dim] qkv projection."""
    qkv = torch.randn(batch, seq, heads + 2 * kv_heads, head_dim, device=device).to(dtype).transpose(1, 2)
    return qkv.split([heads, kv_heads, kv_heads], dim=1)


def _caches(k, cache_batch, cache_len, offsets):
    """Random k and v caches [cache_batch, kv_heads, cache_len, head_dim], NaN at the positions the write must fill
    (offsets[b] + s inside the cache), so a missed one fails; and a bool mask of those positions."""
    batch, kv_heads, seq, head_dim = k.shape
    positions = offsets.long()[:, None].cpu() + torch.arange(seq)
    targets = torch.zeros(cache_batch, 1, cache_len, 1, dtype=torch.bool)
    for b, s in ((positions >= 0) & (positions < cache_len)).nonzero().tolist():
        targets[b, 0, positions[b, s]] = True
    targets = targets.expand(cache_batch, kv_heads, cache_len, head_dim).to(k.device)
    shape = (cache_batch, kv_heads, cache_len, head_dim)
    caches = [torch.randn(shape, device=k.device).to(k.dtype).masked_fill(targets, float("nan")) for _ in range(2)]
    return *caches, targets


def _check_cache_write(q, k, v, cos, sin, cache_batch, cache_len, offsets, interleaved, config=None):
    """rotary_cache_write_fwd against the fp64 reference: q rotated into a NaN-poisoned buffer, the target cache
    positions close to the reference (v bit for bit), every other cache position unchanged."""
    k_cache, v_cache, targets = _caches(k, cache_batch, cache_len, offsets)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = poisoned(q.shape, q.dtype, q.device) if cos is not None else None
    got = rotary_cache_write_fwd(q, k, v, cos, sin, k_cache, v_cache, offsets, interleaved, q_out, config)
    k_ref, v_ref = k_before.double(), v_before.double()
    rotation = (cos.double(), sin.double()) if cos is not None else (None, None)
    q_ref = reference.rotary_cache_write(q.double(), k.double(), v.double(), *rotation, k_ref, v_ref, offsets,
                                         interleaved)
    if cos is None:
        assert got is None
    else:
        assert got is q_out
        assert_close(q_out, q_ref, q.dtype)
    assert_close(k_cache[targets], k_ref[targets], k.dtype)
    assert torch.equal(v_cache[targets].double(), v_ref[targets])
    assert torch.equal(k_cache[~targets], k_before[~targets]) and torch.equal(v_cache[~targets], v_before[~targets])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim, rotary_dim", [(40, 40), (72, 24)])
@pytest.mark.parametrize("seq, offsets", [(1, [0, 7, 12]), (5, [0, 0, 0]), (3, [2, 0, 9])])
def test_cache_write_layouts(dtype, interleaved, head_dim, rotary_dim, seq, offsets, device):
    """Decode (seq 1 at each sequence's length), prefill (offset 0) and several tokens at uneven offsets; packed
    views, GQA (6 heads, 2 kv heads), partial rotary, a cache with more sequences than the batch."""
    q, k, v = _packed_qkv(3, 6, 2, seq, head_dim, dtype, device)
    cos, sin = _cos_sin(3, seq, rotary_dim, interleaved, device, dtype)
    _check_cache_write(q, k, v, cos, sin, 4, 13, torch.tensor(offsets, dtype=torch.int32, device=device), interleaved)


@pytest.mark.parametrize("rotate", [True, False])
def test_cache_write_int64_offsets_shared_cos_small_programs(rotate, device):
    """int64 offsets, cos/sin shared over the batch, many programs (q, k and v blocks' boundaries inside the grid)."""
    q, k, v = _packed_qkv(3, 4, 4, 2, 40, torch.float32, device)
    cos, sin = _cos_sin(1, 2, 40, False, device) if rotate else (None, None)
    offsets = torch.tensor([5, 0, 3], dtype=torch.int64, device=device)
    _check_cache_write(q, k, v, cos, sin, 3, 9, offsets, False, RotaryConfig(4))


def test_cache_write_without_rotation_is_a_copy(device):
    """cos = sin = None (GPT-2): q comes back as given, k and v land in the caches bit for bit."""
    q, k, v = _packed_qkv(3, 4, 2, 3, 40, torch.bfloat16, device)
    k_cache, v_cache = (torch.zeros(3, 2, 8, 40, dtype=torch.bfloat16, device=device) for _ in range(2))
    offsets = torch.tensor([0, 5, 2], dtype=torch.int32, device=device)
    assert tritonize.ops.rotary_cache_write(q, k, v, None, None, k_cache, v_cache, offsets) is q
    for b, offset in enumerate(offsets.tolist()):
        assert torch.equal(k_cache[b, :, offset : offset + 3], k[b])
        assert torch.equal(v_cache[b, :, offset : offset + 3], v[b])


def test_cache_write_past_the_cache_is_skipped(device):
    """Offsets the caller got wrong (beyond the cache, or negative) write only the positions inside it."""
    q, k, v = _packed_qkv(3, 4, 2, 5, 40, torch.float32, device)
    cos, sin = _cos_sin(3, 5, 40, True, device)
    offsets = torch.tensor([6, 100, -3], dtype=torch.int32, device=device)
    with bounds_checked() if INTERPRETED else contextlib.nullcontext():  # and no access outside any tensor
        _check_cache_write(q, k, v, cos, sin, 3, 8, offsets, True)


def test_cache_write_public_op_matches_reference_and_compiles(device):
    q, k, v = _packed_qkv(2, 4, 2, 3, 40, torch.float32, device)
    cos, sin = _cos_sin(2, 3, 24, False, device)
    offsets = torch.tensor([4, 1], dtype=torch.int32, device=device)
    k_ref, v_ref = (torch.zeros(2, 2, 8, 40, device=device, dtype=torch.float64) for _ in range(2))
    q_ref = reference.rotary_cache_write(q.double(), k.double(), v.double(), cos.double(), sin.double(), k_ref, v_ref,
                                         offsets)

    @torch.compile(backend="eager", fullgraph=True)
    def f(q, k, v, cos, sin, k_cache, v_cache, offsets):
        return tritonize.ops.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, offsets) * 2

    k_cache, v_cache = torch.zeros(2, 2, 8, 40, device=device), torch.zeros(2, 2, 8, 40, device=device)
    q_out = f(q, k, v, cos, sin, k_cache, v_cache, offsets)
    assert_close(q_out, q_ref * 2)
    assert_close(k_cache, k_ref)
    assert_close(v_cache, v_ref)


def test_cache_write_empty(device):
    q, k, v = _packed_qkv(2, 4, 2, 0, 16, torch.float32, device)
    k_cache, v_cache = torch.zeros(2, 2, 4, 16, device=device), torch.zeros(2, 2, 4, 16, device=device)
    cos, sin = _cos_sin(1, 0, 16, False, device)
    offsets = torch.zeros(2, dtype=torch.int32, device=device)
    assert tritonize.ops.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, offsets).shape == q.shape
    assert not k_cache.any() and not v_cache.any()


def _cache_write_args(device):
    """Valid arguments: q [2, 4, 3, 16], k and v [2, 2, 3, 16], cos and sin [1, 3, 16], caches [3, 2, 8, 16]."""
    q, k, v = _packed_qkv(2, 4, 2, 3, 16, torch.float32, device)
    cos, sin = _cos_sin(1, 3, 16, False, device)
    caches = [torch.zeros(3, 2, 8, 16, device=device) for _ in range(2)]
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=caches[0], v_cache=caches[1],
                write_offsets=torch.tensor([0, 4], dtype=torch.int32, device=device))


BAD_CACHE_WRITES = {  # name: (change to _cache_write_args, error, words in the message)
    "sin_only": (lambda a: {**a, "cos": None}, ValueError, "both be tensors, or both None"),
    "q_3d_no_rotation": (lambda a: {**a, "q": a["q"][0], "cos": None, "sin": None}, ValueError, "q must have 4 dims"),
    "k_seq": (lambda a: {**a, "k": a["k"][:, :, :2]}, ValueError, "k shape"),
    "v_shape": (lambda a: {**a, "v": a["v"][:, :1]}, ValueError, "must have the same shape"),
    "v_dtype": (lambda a: {**a, "v": a["v"].half()}, TypeError, "v has dtype"),
    "v_not_tensor": (lambda a: {**a, "v": a["v"].tolist()}, TypeError, "v must be a torch.Tensor"),
    "cache_dtype": (lambda a: {**a, "k_cache": a["k_cache"].half()}, TypeError, "k_cache has dtype"),
    "cache_shapes": (lambda a: {**a, "v_cache": a["v_cache"][:, :, :5]}, ValueError, "same shape"),
    "cache_batch": (lambda a: {**a, "k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]}, ValueError,
                    "cannot hold"),
    "cache_heads": (lambda a: {**a, "k_cache": a["k_cache"][:, :1], "v_cache": a["v_cache"][:, :1]}, ValueError,
                    "cannot hold"),
    "cache_too_short": (lambda a: {**a, "k_cache": a["k_cache"][:, :, :2], "v_cache": a["v_cache"][:, :, :2]},
                        ValueError, "cannot hold"),
    "cache_not_contiguous": (lambda a: {**a, "k_cache": a["k_cache"].transpose(1, 2).contiguous().transpose(1, 2),
                                        "v_cache": a["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)},
                             ValueError, "contiguous"),
    "cache_3d": (lambda a: {**a, "k_cache": a["k_cache"][0], "v_cache": a["v_cache"][0]}, ValueError, "4 dims"),
    "offsets_float": (lambda a: {**a, "write_offsets": a["write_offsets"].float()}, TypeError, "int32 or int64"),
    "offsets_batch": (lambda a: {**a, "write_offsets": a["write_offsets"][:1]}, ValueError, "write_offsets must have"),
    "offsets_2d": (lambda a: {**a, "write_offsets": a["write_offsets"][None]}, ValueError, "1 dims"),
    "offsets_list": (lambda a: {**a, "write_offsets": [0, 4]}, TypeError, "write_offsets must be a torch.Tensor"),
    "rotary_dim_odd": (lambda a: {**a, "cos": a["cos"][..., :7], "sin": a["sin"][..., :7]}, ValueError, "rotary_dim"),
    "interleaved": (lambda a: {**a, "interleaved": 1}, TypeError, "interleaved must be a bool"),
}


@pytest.mark.parametrize("case", BAD_CACHE_WRITES)
def test_cache_write_bad_inputs(case, device):
    change, error, words = BAD_CACHE_WRITES[case]
    args = change(_cache_write_args(device))
    interleaved = args.pop("interleaved", False)
    with pytest.raises(error, match=words):
        tritonize.ops.rotary_cache_write(*args.values(), interleaved=interleaved)


def test_cache_write_opcheck(device):
    args = _cache_write_args(device)
    q_out = torch.empty_like(args["q"], memory_format=torch.contiguous_format)
    op = torch.ops.tritonize.rotary_cache_write.default
    torch.library.opcheck(op, (*args.values(), True, q_out))
    torch.library.opcheck(op, (*{**args, "cos": None, "sin": None}.values(), False, None))


@pytest.mark.gpu
@pytest.mark.parametrize("seq, cos_batch", [(1, 8), (2048, 1)])
def test_cache_write_real_sizes(seq, cos_batch, device):
    """Llama-3-8B attention, bf16, at batch 8: a decode step (seq 1 at lengths up to 4000) and a prefill."""
    q, k, v = _packed_qkv(8, 32, 8, seq, 128, torch.bfloat16, device)
    cos, sin = _cos_sin(cos_batch, seq, 128, False, device, torch.bfloat16)
    offsets = torch.randint(0, 4096 - seq + 1, (8,), dtype=torch.int32, device=device) if seq == 1 else \
        torch.zeros(8, dtype=torch.int32, device=device)
    _check_cache_write(q, k, v, cos, sin, 8, 4096, offsets, False)


@pytest.mark.gpu
def test_cache_write_in_a_cuda_graph():
    """One captured write serves every step: the offsets are read on the device at each replay."""
    q, k, v = _packed_qkv(8, 32, 8, 1, 128, torch.bfloat16, "cuda")
    cos, sin = _cos_sin(8, 1, 128, False, "cuda", torch.bfloat16)
    k_cache, v_cache = (torch.zeros(8, 8, 256, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    offsets = torch.zeros(8, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tritonize.ops.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, offsets)  # compile before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out = tritonize.ops.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, offsets)
    q_ref, k_ref = _reference(q, k, cos, sin, False)
    for step in ([3, 0, 255, 17, 100, 1, 64, 200], [4, 1, 254, 18, 101, 2, 65, 201]):
        offsets.copy_(torch.tensor(step, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(q_out, q_ref, torch.bfloat16)
        for b, position in enumerate(step):
            assert_close(k_cache[b, :, position], k_ref[b, :, 0], torch.bfloat16)
            assert torch.equal(v_cache[b, :, position], v[b, :, 0])

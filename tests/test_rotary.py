"""Rotary embeddings (half-rotation and interleaved, partial rotary, GQA, packed views) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, poisoned

import tritonize.ops
from tritonize.kernels import reference
from tritonize.kernels.rotary import RotaryConfig, rotary_fwd

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

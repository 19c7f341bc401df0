"""Matrix-vector products for decode: a few rows of x against a weight read once, at the memory bandwidth.

At one to a few tokens a step, a linear layer is a stream of its weight: every byte is read once and used
for GEMV_MAX_M multiply-adds at most, so tensor cores (16-row tiles) buy nothing and split-K's partial sums
cost a second launch. Here each program owns BLOCK_N output columns for every row of x, streams its
[BLOCK_N, K] slice of the weight in [BLOCK_N, BLOCK_K] tiles along the contiguous K dim (wide, coalesced
loads), multiplies on the CUDA cores in fp32 and reduces over K once per tile. Many narrow programs
(hundreds to thousands) keep enough loads in flight to saturate HBM.

Two prologue / epilogue fusions remove whole launches from a decoder layer:
- RMS_NORM: x is RMS-normalized on the fly (fp32 statistics of the whole row, the normalized value rounded
  to x's dtype before and after the norm weight, as `ops.rms_norm`'s "llama" variant): each program
  re-reads the small x (L2-resident) to get the row's statistics, so the norm needs no kernel of its own.
- GATED: the weight is cat([W_gate, W_up]) [2N, K]; a program streams gate rows n and up rows N + n
  together and stores act(gate) * up (SwiGLU, GeGLU).
- QKV: the packed [q; k; v] projection of a decode step ends in the work of `rotary_cache_write`: the
  epilogue rotates q and k (half rotation or interleaved pairs, partial rotary, or none) and stores q into
  its own [M, heads, 1, head_dim] buffer, k and v straight into the KV caches at each sequence's position.
  Each program owns BLOCK_N / 2 rotation pairs instead of BLOCK_N consecutive rows (`_qkv_rows`: only the
  rows' indices change, the weight is read in place), so both members of a pair sit in its accumulator.
Bias, activation and residual use linear's epilogue. Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import (
    INTERPRETED,
    card_name,
    cast,
    pdl_supported,
    wait_previous_allow_next,
)
from tritonize.kernels.gated_mlp import _gated_epilogue
from tritonize.kernels.linear import _epilogue

GEMV_MAX_M = 2  # up to this many rows CUDA cores keep up with HBM (tensor-core tiles won from 4 rows on an H100)
# Per card, the weight size above which the tensor-core path streams faster (benchmarks/sweep_gemv.py): on an
# H200 the GEMV levels off near 3.4 TB/s on weights of 100 MB and more, where the tiled path and cuBLAS reach
# 4.1-4.3 TB/s; up to 50 MB it wins. On the H100 it won at every Llama decode shape, up to the 1 GB lm_head.
# Cards not listed: no limit.
MAX_WEIGHT_BYTES = {"NVIDIA H200": 64 << 20}


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """BLOCK_N output columns per program, BLOCK_K weight columns per loop step, launch options."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _load_weight_tile(w_rows, k, offs_k, K):
    """Weight columns k .. k + BLOCK_K of the program's rows ([BLOCK_N, BLOCK_K]); zero past K (no traffic
    for a tile wholly past K: the loop's prefetch of the step after the last)."""
    cols = k + offs_k
    return tl.load(w_rows + cols[None, :], mask=(cols < K)[None, :], other=0.0)


@triton.jit
def _qkv_rows(program, head_dim, rotary_dim, HALF_ROTATION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weight rows of `program` in QKV mode, [BLOCK_N]: its BLOCK_N / 2 rotation pairs, pair i's two rows in
    columns 2i and 2i + 1. Pair p is dim pair j = p % (head_dim / 2) of head p // (head_dim / 2) (the heads of
    q, k and v in the packed weight's order): dims (j, j + rotary_dim / 2) for j < rotary_dim / 2 with
    HALF_ROTATION, else (2j, 2j + 1) (interleaved pairs, dims past rotary_dim, v). Pairs past the last give rows
    >= N."""
    column = tl.arange(0, BLOCK_N)
    pair = program * (BLOCK_N // 2) + column // 2
    head, j, second = pair // (head_dim // 2), pair % (head_dim // 2), column % 2
    dim = 2 * j + second
    if HALF_ROTATION:
        dim = tl.where(j < rotary_dim // 2, j + second * (rotary_dim // 2), dim)
    return head * head_dim + dim


@triton.jit
def _qkv_epilogue(
    acc, offs_m, offs_n, M, N, B_ptr, Q_ptr, KCache_ptr, VCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr,
    heads, kv_heads, head_dim, rotary_dim, cache_len, cos_row_stride, cos_col_stride,
    HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """acc + bias over the rows offs_n of the packed qkv (laid out by `_qkv_rows`), rounded to q's dtype as the
    unfused projection stores it; q and k rotated in fp32 over their first rotary_dim dims unless ROTARY is
    "none" (each pair (x1, x2) -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin), cos and sin taken at each member's
    own dim); q stored to Q_ptr, k and v to the caches at position offsets[m], skipped outside [0, cache_len)."""
    rows = offs_m.to(tl.int64)[:, None]
    row_ok = rows < M
    head, dim = (offs_n // head_dim)[None, :], (offs_n % head_dim)[None, :]
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_n[None, :], mask=offs_n[None, :] < N, other=0.0).to(tl.float32)
    acc = cast(acc, Q_ptr.dtype.element_ty).to(tl.float32)
    if ROTARY != "none":
        rotated = row_ok & (head < heads + kv_heads) & (dim < rotary_dim)
        cs_offsets = rows * cos_row_stride + dim * cos_col_stride
        cos1, cos2 = tl.split(tl.reshape(tl.load(Cos_ptr + cs_offsets, mask=rotated, other=0.0).to(tl.float32),
                                         (BLOCK_M, BLOCK_N // 2, 2)))
        sin1, sin2 = tl.split(tl.reshape(tl.load(Sin_ptr + cs_offsets, mask=rotated, other=0.0).to(tl.float32),
                                         (BLOCK_M, BLOCK_N // 2, 2)))
        x1, x2 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        pairs = tl.join(x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2)
        acc = tl.where(rotated, tl.reshape(pairs, (BLOCK_M, BLOCK_N)), acc)
    out = cast(acc, Q_ptr.dtype.element_ty)
    tl.store(Q_ptr + rows * (heads * head_dim) + offs_n[None, :], out, mask=row_ok & (head < heads))
    position = tl.load(Offsets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    written = row_ok & (offs_n < N)[None, :] & (position >= 0) & (position < cache_len)
    is_v = head >= heads + kv_heads
    kv_head = head - heads - tl.where(is_v, kv_heads, 0)
    cache_offsets = ((rows * kv_heads + kv_head) * cache_len + position) * head_dim + dim
    tl.store(KCache_ptr + cache_offsets, out, mask=written & (head >= heads) & ~is_v)
    tl.store(VCache_ptr + cache_offsets, out, mask=written & is_v)


@triton.jit
def _gemv_kernel(
    X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K, eps,
    x_row_stride, w_row_stride, r_row_stride, r_col_stride,
    KCache_ptr, VCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr, heads, kv_heads, head_dim, rotary_dim, cache_len,
    cos_row_stride, cos_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr,
    GATED: tl.constexpr, QKV: tl.constexpr, ROTARY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Y[:, n] for the BLOCK_N columns n of this program and every row of x.

    X_ptr: x [M, K], rows x_row_stride apart, K contiguous; M <= BLOCK_M. W_ptr: weight [N, K] (or
    cat([W_gate, W_up]) [2N, K] with GATED), rows w_row_stride apart, K contiguous. B_ptr: bias [N]
    ([2N] with GATED), contiguous. R_ptr: residual [M, N] with strides (r_row_stride, r_col_stride).
    Y_ptr: output [M, N], contiguous. G_ptr: the RMSNorm weight [K], contiguous (with RMS_NORM).
    QKV: W is the packed [q; k; v] weight, N = (heads + 2 * kv_heads) * head_dim, head_dim even, BLOCK_N even;
    the epilogue is `_qkv_epilogue`'s: Y_ptr is q [M, heads, 1, head_dim], contiguous; KCache_ptr, VCache_ptr:
    contiguous [>= M, kv_heads, cache_len, head_dim]; Offsets_ptr: [M] int32 or int64, row m's cache position;
    Cos_ptr, Sin_ptr (unless ROTARY is "none"): [M or 1, rotary_dim] with strides (cos_row_stride, 0 when
    shared, cos_col_stride). ROTARY: "half" (Llama, NeoX), "interleaved" (GPT-J) or "none".
    PDL: launched as a programmatic dependent launch; the first two weight tiles are loaded before waiting
    for the previous kernel (the weight is never written by a kernel), so the loads overlap its end; x, cos,
    sin and the offsets, which earlier kernels write, are read after the wait.
    Grid: (cdiv(N, BLOCK_N),).
    """
    offs_m = tl.arange(0, BLOCK_M)
    if QKV:
        offs_n = _qkv_rows(tl.program_id(0), head_dim, rotary_dim, ROTARY == "half", BLOCK_N)
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * x_row_stride
    # columns past N wrap onto real weight rows: loads stay in bounds, their results are never stored
    w_rows = W_ptr + (offs_n % N).to(tl.int64)[:, None] * w_row_stride
    up_rows = w_rows + N * w_row_stride
    # -- the weight is read two tiles ahead (registers triple-buffered); the first two before the wait --
    w0 = _load_weight_tile(w_rows, 0, offs_k, K)
    w1 = _load_weight_tile(w_rows, BLOCK_K, offs_k, K)
    up0, up1 = w0, w1
    if GATED:
        up0 = _load_weight_tile(up_rows, 0, offs_k, K)
        up1 = _load_weight_tile(up_rows, BLOCK_K, offs_k, K)
    wait_previous_allow_next(PDL)

    # -- prologue: each row's inverse RMS over all of K (x is small and stays in L2) --
    if RMS_NORM:
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_ok & ((k + offs_k) < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            squares += x * x
        inv_rms = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]

    # -- the weight stream: products of one [BLOCK_N, BLOCK_K] tile (two with GATED), reduced over K --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        x = tl.load(x_rows + cols[None, :], mask=m_ok & (cols < K)[None, :], other=0.0).to(tl.float32)
        if RMS_NORM:
            g = tl.load(G_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = cast(x * inv_rms, X_ptr.dtype.element_ty).to(tl.float32) * g[None, :]
            x = cast(x, X_ptr.dtype.element_ty).to(tl.float32)
        w2 = _load_weight_tile(w_rows, k + 2 * BLOCK_K, offs_k, K)
        acc += tl.sum(x[:, None, :] * w0.to(tl.float32)[None, :, :], axis=2)
        w0, w1 = w1, w2
        if GATED:
            up2 = _load_weight_tile(up_rows, k + 2 * BLOCK_K, offs_k, K)
            acc_up += tl.sum(x[:, None, :] * up0.to(tl.float32)[None, :, :], axis=2)
            up0, up1 = up1, up2

    if GATED:
        _gated_epilogue(acc, acc_up, offs_m, offs_n, M, N, B_ptr, Y_ptr, HAS_BIAS, ACTIVATION)
    elif QKV:
        _qkv_epilogue(
            acc, offs_m, offs_n, M, N, B_ptr, Y_ptr, KCache_ptr, VCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr,
            heads, kv_heads, head_dim, rotary_dim, cache_len, cos_row_stride, cos_col_stride,
            HAS_BIAS, ROTARY, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    else:
        _epilogue(
            acc, offs_m, offs_n, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )  # fmt: skip


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv_fwd takes these operands: at most GEMV_MAX_M rows, both with a contiguous K dim."""
    return x.shape[0] <= GEMV_MAX_M and x.stride(1) == 1 and weight.stride(1) == 1


def preferred(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether tritonize.ops should run these operands through the GEMV: supported, and a weight within the
    card's MAX_WEIGHT_BYTES (beyond it the tensor-core path is faster)."""
    weight_bytes = weight.numel() * weight.element_size()
    return supports(x, weight) and weight_bytes <= MAX_WEIGHT_BYTES.get(card_name(weight.device), math.inf)


@functools.lru_cache(maxsize=1024)
def pick_config(M: int, N: int, K: int, dtype: torch.dtype) -> GemvConfig:
    """Four weight rows per program in 1024-wide steps along K (8 KB of bf16 per load), 4 warps: the best
    config at every Llama-style decode shape in the H100 sweep (benchmarks/sweep_gemv.py), where wider K
    steps always won. Under the interpreter: few, large blocks (CPU tests stay quick)."""
    block_k = min(1024, max(16, triton.next_power_of_2(K)))
    if INTERPRETED:
        return GemvConfig(block_n=32, block_k=min(256, block_k), num_warps=4)
    return GemvConfig(block_n=4, block_k=block_k, num_warps=4, num_stages=1)


def gemv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    *,
    gated: bool = False,
    rms_norm_weight: torch.Tensor | None = None,
    rms_norm_eps: float = 0.0,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """activation(norm(x) @ weight^T + bias) + residual as a contiguous [M, N] tensor in x's dtype.

    x: [M, K] with M <= GEMV_MAX_M and K contiguous (`supports`); weight: [N, K], K contiguous, or with
    gated, cat([W_gate, W_up]) [2N, K] and the result act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up)
    (no residual then). rms_norm_weight: [K], applies RMSNorm ("llama" numerics, rms_norm_eps) to x first.
    bias: [N] ([2N] gated); residual: [M, N]. Validated by tritonize.ops. pdl: launch as a programmatic
    dependent launch (default: where the GPU has it, sm_90+), its weight prefetch overlapping the previous kernel.
    """
    M, N = x.shape[0], weight.shape[0] // (2 if gated else 1)
    if not supports(x, weight):
        raise ValueError(f"gemv_fwd takes at most {GEMV_MAX_M} rows with a contiguous last dim, got x "
                         f"{tuple(x.shape)} strides {x.stride()}, weight strides {weight.stride()}")
    if gated and residual is not None:
        raise ValueError("gemv_fwd: a gated product takes no residual")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_strides = (0, 0) if residual is None else residual.stride()
    _launch(
        x, weight, N, out, rms_norm_weight, rms_norm_eps, config, pdl,
        B_ptr=None if bias is None else bias.contiguous(), R_ptr=residual, r_row_stride=res_strides[0],
        r_col_stride=res_strides[1], HAS_BIAS=bias is not None, ACTIVATION=activation or "none",
        HAS_RESIDUAL=residual is not None, GATED=gated,
    )  # fmt: skip
    return out


def qkv_rotary_cache_write_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_offsets: torch.Tensor,
    interleaved: bool,
    *,
    rms_norm_weight: torch.Tensor | None = None,
    rms_norm_eps: float = 0.0,
    q_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """`rotary_cache_write` of the packed projection norm(x) @ weight^T + bias of one token a sequence, in one
    launch; returns q rotated, [M, heads, 1, head_dim], contiguous in x's dtype (q_out when given).

    x: [M, K], one row a sequence, M <= GEMV_MAX_M and K contiguous; weight: [(heads + 2 * kv_heads) * head_dim,
    K], K contiguous, the rows of q's heads, k's and v's in order; bias: [that many] or None. k_cache, v_cache:
    contiguous [cache_batch >= M, kv_heads, cache_len, head_dim], head_dim even, in x's dtype: k (rotated) and v
    of row m go to position write_offsets[m] (int32 or int64 [M], on the device), skipped outside
    [0, cache_len). cos, sin: [M or 1, 1, rotary_dim] (rotary_dim even, <= head_dim) with equal strides, the
    rotation of each row's position, or both None (no rotation); interleaved as `rotary_fwd` takes it.
    rms_norm_weight, rms_norm_eps, config, pdl as `gemv_fwd` takes them. Validated by tritonize.ops.
    """
    M = x.shape[0]
    kv_heads, cache_len, head_dim = k_cache.shape[1:]
    heads = weight.shape[0] // head_dim - 2 * kv_heads
    if not supports(x, weight) or head_dim % 2:
        raise ValueError(f"qkv_rotary_cache_write_fwd takes at most {GEMV_MAX_M} rows with a contiguous last dim "
                         f"and an even head_dim, got x {tuple(x.shape)} strides {x.stride()}, weight strides "
                         f"{weight.stride()}, head_dim {head_dim}")
    if config is not None and config.block_n % 2:
        raise ValueError(f"qkv_rotary_cache_write_fwd needs an even block_n (whole rotation pairs), got {config}")
    if q_out is None:
        q_out = torch.empty((M, heads, 1, head_dim), dtype=x.dtype, device=x.device)
    rotate = cos is not None
    if rotate and sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    _launch(
        x, weight, weight.shape[0], q_out, rms_norm_weight, rms_norm_eps, config, pdl,
        B_ptr=None if bias is None else bias.contiguous(), HAS_BIAS=bias is not None, QKV=True,
        KCache_ptr=k_cache, VCache_ptr=v_cache, Cos_ptr=cos, Sin_ptr=sin, Offsets_ptr=write_offsets,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary_dim=cos.shape[-1] if rotate else 0,
        cache_len=cache_len, cos_row_stride=cos.stride(0) if rotate and cos.shape[0] > 1 else 0,
        cos_col_stride=cos.stride(-1) if rotate else 0,
        ROTARY=("interleaved" if interleaved else "half") if rotate else "none",
    )  # fmt: skip
    return q_out


# _gemv_kernel's arguments that only some modes read, as a mode that ignores them takes them
_UNUSED_ARGUMENTS = dict(
    B_ptr=None, R_ptr=None, r_row_stride=0, r_col_stride=0, HAS_BIAS=False, ACTIVATION="none", HAS_RESIDUAL=False,
    GATED=False, QKV=False, ROTARY="none", KCache_ptr=None, VCache_ptr=None, Cos_ptr=None, Sin_ptr=None,
    Offsets_ptr=None, heads=0, kv_heads=0, head_dim=1, rotary_dim=0, cache_len=0, cos_row_stride=0,
    cos_col_stride=0,
)


def _launch(x, weight, N, out, rms_norm_weight, rms_norm_eps, config, pdl, **mode_arguments) -> None:
    """_gemv_kernel over N output columns (weight rows, or gate / up row pairs with GATED) of x [M, K] into out,
    the arguments of its mode given by name."""
    M, K = x.shape
    if M == 0:
        return
    config = config or pick_config(M, N, K, x.dtype)
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _gemv_kernel[(triton.cdiv(N, config.block_n),)](
        X_ptr=x, W_ptr=weight, Y_ptr=out, M=M, N=N, K=K, x_row_stride=x.stride(0), w_row_stride=weight.stride(0),
        G_ptr=None if rms_norm_weight is None else rms_norm_weight.contiguous(), eps=float(rms_norm_eps),
        RMS_NORM=rms_norm_weight is not None, BLOCK_M=max(1, triton.next_power_of_2(M)),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
        **{**_UNUSED_ARGUMENTS, **mode_arguments},
    )  # fmt: skip

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
def _stream_tile(rows, next_rows, t, num_tiles, next_ok, offs_k, K, BLOCK_K: tl.constexpr):
    """Tile t of a row block's num_tiles (K // BLOCK_K rounded up) weight tiles; past the last, tile
    t - num_tiles of the next row block's (rows next_rows; zeros and no traffic unless next_ok)."""
    in_block = t < num_tiles
    base = tl.where(in_block, rows, next_rows)
    cols = tl.where(in_block, t, t - num_tiles) * BLOCK_K + offs_k
    limit = tl.where(in_block | next_ok, K, 0)
    return tl.load(base + cols[None, :], mask=(cols < limit)[None, :], other=0.0)


@triton.jit
def _first_tiles(W_ptr, n_block, N, K, w_row_stride, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """The first two weight tiles of row block n_block (and of its up rows with GATED): (w0, w1, up0, up1).
    A block past N loads nothing (its tiles are zeros)."""
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    K_in_block = tl.where(n_block * BLOCK_N < N, K, 0)
    w_rows = W_ptr + (offs_n % N).to(tl.int64)[:, None] * w_row_stride
    w0 = _load_weight_tile(w_rows, 0, offs_k, K_in_block)
    w1 = _load_weight_tile(w_rows, BLOCK_K, offs_k, K_in_block)
    up0, up1 = w0, w1
    if GATED:
        up_rows = w_rows + N * w_row_stride
        up0 = _load_weight_tile(up_rows, 0, offs_k, K_in_block)
        up1 = _load_weight_tile(up_rows, BLOCK_K, offs_k, K_in_block)
    return w0, w1, up0, up1


@triton.jit
def _gemv_block(
    n_block, next_block, w0, w1, up0, up1, X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K, eps,
    x_row_stride, w_row_stride, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STREAM: tl.constexpr,
):  # fmt: skip
    """Y[:, n] for the BLOCK_N columns n of row block n_block and every row of x, given the block's first two
    weight tiles (`_first_tiles`). Arguments as `_gemv_kernel`'s.

    STREAM (K > BLOCK_K only): the loop's reads two tiles ahead run on into row block next_block (none past
    N), so a program streaming several blocks never waits for a block's first tiles; returns next_block's
    first tiles (w0, w1, up0, up1) for the following call. Without STREAM, the tiles ahead stop at K."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * x_row_stride
    # columns past N wrap onto real weight rows: loads stay in bounds, their results are never stored
    w_rows = W_ptr + (offs_n % N).to(tl.int64)[:, None] * w_row_stride
    up_rows = w_rows + N * w_row_stride
    if STREAM:  # where the reads ahead continue past K: next_block's rows
        next_rows = W_ptr + ((next_block * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)[:, None] * w_row_stride
        next_up_rows = next_rows + N * w_row_stride
        num_tiles = tl.cdiv(K, BLOCK_K)
        next_ok = next_block * BLOCK_N < N

    # -- prologue: each row's inverse RMS over all of K (x is small and stays in L2) --
    if RMS_NORM:
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_ok & ((k + offs_k) < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            squares += x * x
        inv_rms = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]

    # -- the weight stream, read two tiles ahead (registers triple-buffered): products of one
    # [BLOCK_N, BLOCK_K] tile (two with GATED), reduced over K --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        x = tl.load(x_rows + cols[None, :], mask=m_ok & (cols < K)[None, :], other=0.0).to(tl.float32)
        if RMS_NORM:
            g = tl.load(G_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = cast(x * inv_rms, X_ptr.dtype.element_ty).to(tl.float32) * g[None, :]
            x = cast(x, X_ptr.dtype.element_ty).to(tl.float32)
        if STREAM:
            w2 = _stream_tile(w_rows, next_rows, k // BLOCK_K + 2, num_tiles, next_ok, offs_k, K, BLOCK_K)
        else:
            w2 = _load_weight_tile(w_rows, k + 2 * BLOCK_K, offs_k, K)
        acc += tl.sum(x[:, None, :] * w0.to(tl.float32)[None, :, :], axis=2)
        w0, w1 = w1, w2
        if GATED:
            if STREAM:
                up2 = _stream_tile(up_rows, next_up_rows, k // BLOCK_K + 2, num_tiles, next_ok, offs_k, K, BLOCK_K)
            else:
                up2 = _load_weight_tile(up_rows, k + 2 * BLOCK_K, offs_k, K)
            acc_up += tl.sum(x[:, None, :] * up0.to(tl.float32)[None, :, :], axis=2)
            up0, up1 = up1, up2

    if GATED:
        _gated_epilogue(acc, acc_up, offs_m, offs_n, M, N, B_ptr, Y_ptr, HAS_BIAS, ACTIVATION)
    else:
        _epilogue(
            acc, offs_m, offs_n, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )  # fmt: skip
    return w0, w1, up0, up1


@triton.jit
def _gemv_kernel(
    X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K, eps,
    x_row_stride, w_row_stride, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Y[:, n] for the BLOCK_N columns n of this program and every row of x.

    X_ptr: x [M, K], rows x_row_stride apart, K contiguous; M <= BLOCK_M. W_ptr: weight [N, K] (or
    cat([W_gate, W_up]) [2N, K] with GATED), rows w_row_stride apart, K contiguous. B_ptr: bias [N]
    ([2N] with GATED), contiguous. R_ptr: residual [M, N] with strides (r_row_stride, r_col_stride).
    Y_ptr: output [M, N], contiguous. G_ptr: the RMSNorm weight [K], contiguous (with RMS_NORM).
    PDL: launched as a programmatic dependent launch; the first two weight tiles are loaded before waiting
    for the previous kernel (the weight is never written by a kernel), so the loads overlap its end.
    Grid: (cdiv(N, BLOCK_N),).
    """
    n_block = tl.program_id(0)
    w0, w1, up0, up1 = _first_tiles(W_ptr, n_block, N, K, w_row_stride, GATED, BLOCK_N, BLOCK_K)
    wait_previous_allow_next(PDL)
    _gemv_block(
        n_block, n_block, w0, w1, up0, up1, X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K, eps,
        x_row_stride, w_row_stride, r_row_stride, r_col_stride,
        HAS_BIAS, ACTIVATION, HAS_RESIDUAL, RMS_NORM, GATED, BLOCK_M, BLOCK_N, BLOCK_K, False,
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
    (M, K), N = x.shape, weight.shape[0] // (2 if gated else 1)
    if not supports(x, weight):
        raise ValueError(f"gemv_fwd takes at most {GEMV_MAX_M} rows with a contiguous last dim, got x "
                         f"{tuple(x.shape)} strides {x.stride()}, weight strides {weight.stride()}")
    if gated and residual is not None:
        raise ValueError("gemv_fwd: a gated product takes no residual")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    config = config or pick_config(M, N, K, x.dtype)
    res_strides = (0, 0) if residual is None else residual.stride()
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _gemv_kernel[(triton.cdiv(N, config.block_n),)](
        x, weight, None if bias is None else bias.contiguous(), residual, out,
        None if rms_norm_weight is None else rms_norm_weight.contiguous(), M, N, K, float(rms_norm_eps),
        x.stride(0), weight.stride(0), *res_strides,
        HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RESIDUAL=residual is not None,
        RMS_NORM=rms_norm_weight is not None, GATED=gated, BLOCK_M=max(1, triton.next_power_of_2(M)),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out

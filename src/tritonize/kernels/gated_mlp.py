"""Gated MLP (SwiGLU, GeGLU): act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up) from one concatenated weight.

Each program accumulates the same output tile of the gate and of the up projection over the same x tiles
and stores act(gate) * up once. Tile order, activations, configs and split-K rules come from linear.py.
Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import cast, dot, dot_precision
from tritonize.kernels.linear import LinearConfig, _activation, _num_tiles, _pick_config, _tile_coords


@triton.jit
def _gated_epilogue(gate, up, offs_m, offs_n, M, N, B_ptr, Y_ptr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Y[offs_m, offs_n] = act(gate + b_gate) * (up + b_up) in fp32, stored in Y's dtype (Y: [M, N])."""
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n[None, :]
    mask = (rows < M) & (cols < N)
    if HAS_BIAS:
        gate += tl.load(B_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        up += tl.load(B_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = _activation(gate, ACTIVATION) * up
    tl.store(Y_ptr + rows * N + cols, cast(y, Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_mlp_kernel(
    X_ptr, W_ptr, B_ptr, Y_ptr, Partial_ptr, M, N, K, k_split_size,
    x_row_stride, x_col_stride, w_row_stride, w_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of the gate and of the up projection over K range [pid_k * k_split_size, +).

    X_ptr: x [M, K] with strides (x_row_stride, x_col_stride). W_ptr: cat([W_gate, W_up]) [2N, K] with
    strides (w_row_stride, w_col_stride): gate rows 0..N-1, up rows N..2N-1. B_ptr: the bias [2N], contiguous
    (unused without HAS_BIAS). Y_ptr: output [M, N], contiguous. Partial_ptr: fp32 [SPLIT_K, 2, M, N]
    workspace (gate, up) for SPLIT_K > 1, reduced by _gated_split_k_reduce_kernel.
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # -- K loop as in linear's: rows past M / columns past N wrap (never stored); K is masked --
    k_start = pid_k * k_split_size
    k_end = tl.minimum(K, k_start + k_split_size)
    x_ptrs = X_ptr + (offs_m % M).to(tl.int64)[:, None] * x_row_stride + (k_start + offs_k)[None, :] * x_col_stride
    gate_rows = (offs_n % N).to(tl.int64)[None, :]
    w_cols = (k_start + offs_k)[:, None] * w_col_stride
    g_ptrs = W_ptr + gate_rows * w_row_stride + w_cols
    u_ptrs = W_ptr + (gate_rows + N) * w_row_stride + w_cols
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w_gate = tl.load(g_ptrs)
            w_up = tl.load(u_ptrs)
        else:
            k_mask = (k + offs_k) < k_end
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w_gate = tl.load(g_ptrs, mask=k_mask[:, None], other=0.0)
            w_up = tl.load(u_ptrs, mask=k_mask[:, None], other=0.0)
        acc_gate = dot(x, w_gate, acc_gate, INPUT_PRECISION)
        acc_up = dot(x, w_up, acc_up, INPUT_PRECISION)
        x_ptrs += BLOCK_K * x_col_stride
        g_ptrs += BLOCK_K * w_col_stride
        u_ptrs += BLOCK_K * w_col_stride

    if SPLIT_K == 1:
        _gated_epilogue(acc_gate, acc_up, offs_m, offs_n, M, N, B_ptr, Y_ptr, HAS_BIAS, ACTIVATION)
    else:
        rows, cols = offs_m.to(tl.int64)[:, None], offs_n[None, :]
        mask = (rows < M) & (cols < N)
        gate_ptrs = Partial_ptr + (2 * pid_k * M + rows) * N + cols
        tl.store(gate_ptrs, acc_gate, mask=mask)
        tl.store(gate_ptrs + M * N, acc_up, mask=mask)


@triton.jit
def _gated_split_k_reduce_kernel(
    Partial_ptr, B_ptr, Y_ptr, M, N,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Sums the SPLIT_K fp32 (gate, up) partials [SPLIT_K, 2, M, N] in a fixed order, then the gated epilogue.

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n[None, :]
    mask = (rows < M) & (cols < N)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        gate_ptrs = Partial_ptr + (2 * split * M + rows) * N + cols
        gate += tl.load(gate_ptrs, mask=mask, other=0.0)
        up += tl.load(gate_ptrs + M * N, mask=mask, other=0.0)
    _gated_epilogue(gate, up, offs_m, offs_n, M, N, B_ptr, Y_ptr, HAS_BIAS, ACTIVATION)


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    """linear's choice for the [M, 2N] output of the concatenated weight, run by the pointer kernel.

    A gated tile of block_n // 2 gate and block_n // 2 up columns loads and accumulates as much as a linear
    tile of block_n columns, so shared memory, registers, the program count and the split-K rule carry over.
    """
    return dataclasses.replace(_pick_config(M, 2 * N, K, dtype, device), persistent=False)


def gated_mlp_fwd(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    out: torch.Tensor | None = None,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up) as a contiguous [M, N] tensor in x's dtype.

    x: [M, K]; gate_up_weight: cat([W_gate, W_up], dim=0), [2N, K]; bias: cat([b_gate, b_up]), [2N]; any
    strides. activation: "silu", "gelu" or "gelu_tanh". out: an optional contiguous [M, N] buffer.
    config: a LinearConfig whose block_n counts gate and up columns together (see pick_config); its
    persistent flag is ignored.
    """
    (M, K), N = x.shape, gate_up_weight.shape[0] // 2
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    config = config or pick_config(M, N, K, x.dtype, x.device)
    block_n = max(16, config.block_n // 2)
    bias = None if bias is None else bias.contiguous()
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=activation)
    partial = out
    if config.split_k > 1:
        partial = torch.empty((config.split_k, 2, M, N), dtype=torch.float32, device=x.device)
    k_split_size = triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k
    grid = (_num_tiles(dataclasses.replace(config, block_n=block_n), M, N), config.split_k)
    _gated_mlp_kernel[grid](
        x, gate_up_weight, bias, out, partial, M, N, K, k_split_size, *x.stride(), *gate_up_weight.stride(),
        **flags, SPLIT_K=config.split_k, INPUT_PRECISION=dot_precision(x.dtype), BLOCK_M=config.block_m,
        BLOCK_N=block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=K % (config.block_k * config.split_k) == 0, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if config.split_k > 1:
        block_m, block_n = min(16, triton.next_power_of_2(M)), 256
        _gated_split_k_reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            partial, bias, out, M, N, **flags, SPLIT_K=config.split_k, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return out

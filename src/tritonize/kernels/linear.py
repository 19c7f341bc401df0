"""Fused linear layer: activation(x @ weight^T + bias) + residual with fp32 accumulation.

Three launch shapes share one epilogue (bias, activation, residual, store):
- a persistent matmul for M > 16 (one or two programs per SM looping over output tiles, x and weight tiles
  loaded through tensor descriptors, i.e. TMA on Hopper) when x and weight allow TMA;
- a grouped, tiled pointer matmul for every other layout, and the split-K path for few tiles;
- skinny 16-row tiles split over K for decode (M <= 16).
Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from tritonize.kernels.common import (
    INTERPRETED,
    L2_LINE_BYTES,
    cast,
    dot,
    dot_precision,
    pdl_supported,
    prefetch_to_l2,
    wait_previous_allow_next,
)
from tritonize.kernels.norm import launch_config as norm_launch_config
from tritonize.kernels.norm import layer_norm_fwd, layer_norm_rows

SKINNY_MAX_M = 16  # tl.dot needs 16 rows; up to this many tokens the weight read dominates
INTERPRETER_SM_COUNT = 4  # a pretend GPU: small CPU test shapes take the split-K paths and loop over tiles
SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (an H100 block may opt into 227 KiB)
# linear_layer_norm_fwd's split-K reduce holds whole rows in one program: up to this many columns
MAX_FUSED_NORM_COLS = 8192
# The tiled kernel, launched with PDL, prefetches its weight slice into L2 before waiting for the previous
# kernel when x has at most this many rows (where the product is short and its weight read is most of it).
# bert-base fp16 in tritonize's CUDA graphs on an H100, A/B in one process (2026-12-07,
# ab-prefetch-prologue-bert-base-*.json): 1 x 16 0.341 vs 0.354 ms, 1 x 128 0.422 vs 0.443 ms, but 1 x 512
# 0.695 vs 0.637 ms and 8 x 128 0.835 vs 0.764 ms, where many row blocks prefetch the same weight columns.
PREFETCH_WEIGHT_MAX_M = 128


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Tile sizes, GROUP_M row blocks per weight column sweep, launch options, and K splits.

    persistent: one program per SM loops over the tiles, loading through tensor descriptors (TMA);
    used where the GPU has TMA (sm_90+; the interpreter emulates it) and x and weight allow it,
    otherwise the tiled pointer kernel runs the same tiles.
    programs_per_sm (persistent only): programs resident on each SM at once, so that one program's
    epilogue (a GELU is ALU work the tensor cores wait for) overlaps another's main loop. H100, the
    4096 x 3072 x 768 GELU up projection: 128 x 128 tiles, 3 stages, 2 programs per SM 47.6 us vs 51.4 us
    for the best single-program config (sweeps-gelu-layernorm-prologue-*.json); equal at M = 16384.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    persistent: bool = False
    programs_per_sm: int = 1

    def __post_init__(self):
        if self.persistent and self.split_k != 1:
            raise ValueError("a persistent config cannot split K")
        if self.programs_per_sm < 1 or (self.programs_per_sm > 1 and not self.persistent):
            raise ValueError(f"programs_per_sm must be 1, or more for a persistent config; got {self.programs_per_sm}")


# Tiles for M > 16, biggest first, each with a guessed tensor-core efficiency (bigger tiles reuse
# more of what they load) used to trade tile size against wave quantization on the SMs. The heuristic
# runs them persistent where it can (see _pick_config).
# Prefill with enough tiles to fill the SMs: persistent through TMA (linear_fwd falls back to pointer
# loads for other layouts). Best of the H100 sweep at BERT and Llama shapes (kernel-sweep-linear-*).
# Exact fp32 dots (FMA, no tensor cores) spill heavily there and keep the pointer kernel.
_PERSISTENT = LinearConfig(128, 128, 64, num_warps=8, num_stages=4, persistent=True)
_TILES = (
    (LinearConfig(128, 256, 64, num_warps=8, num_stages=3), 1.0),
    (LinearConfig(128, 128, 64, num_warps=4, num_stages=4), 0.9),
    (LinearConfig(64, 128, 64, num_warps=4, num_stages=4), 0.75),
    (LinearConfig(64, 64, 64, num_warps=4, num_stages=4), 0.55),
)
# Decode: 16-row tiles over narrow weight column blocks with long K steps (block_n 64 for wide
# weights, 32 otherwise), split over K as needed; chosen from `tritonize bench-kernels --sweep` on an
# H100 timed in CUDA graphs (benchmarks/results/kernel-sweep-linear-*.json).
_SKINNY = LinearConfig(16, 64, 256, group_m=1, num_warps=4, num_stages=4)


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = _gelu(y)
    elif ACTIVATION == "gelu_tanh":
        y = 0.5 * y * (1.0 + _tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    elif ACTIVATION == "silu":
        y = y * tl.sigmoid(y)
    elif ACTIVATION == "tanh":
        y = _tanh(y)
    return y


@triton.jit
def _gelu(y):
    """Exact (erf) GELU in fp32, 0.5 * y * (1 + erf(y / sqrt 2)), through erfc(|y| / sqrt 2) from the Chebyshev
    fit of Numerical Recipes (6.2, relative error < 1.2e-7): for y < 0, 1 + erf = erfc directly, so small
    negative outputs keep their relative accuracy (within 8e-6 of fp64 down to y = -9, where torch's fp32
    GELU loses every digit); no branches. Measured on an H100 at 4096 x 3072 outputs: the GEMM's GELU epilogue
    took 17 us with libdevice's erf (half the matmul's own time)."""
    z = tl.abs(y) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    erfc = t * tl.exp(p - z * z)
    return 0.5 * y * tl.where(y >= 0, 2.0 - erfc, erfc)


@triton.jit
def _tanh(y):
    t = tl.exp(-2.0 * tl.abs(y))  # in (0, 1]: no overflow for any y
    magnitude = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0, -magnitude, magnitude)


@triton.jit
def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `tile_id` in grouped order: GROUP_M consecutive row
    blocks sweep the weight column blocks together, so each weight tile is reused from L2."""
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_first_m = (tile_id // (GROUP_M * num_pid_n)) * GROUP_M
    group_size_m = min(num_pid_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (tile_id % (GROUP_M * num_pid_n)) % group_size_m
    pid_n = (tile_id % (GROUP_M * num_pid_n)) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Y[offs_m, offs_n] = activation(acc + bias) + residual, in fp32, stored in Y's dtype."""
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n[None, :]
    mask = (rows < M) & (cols < N)
    acc = _epilogue_values(acc, rows, cols, mask, N, B_ptr, R_ptr, r_row_stride, r_col_stride,
                           HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    tl.store(Y_ptr + rows * N + cols, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_values(
    acc, rows, cols, mask, N, B_ptr, R_ptr, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """activation(acc + bias) + residual in fp32 at rows [BLOCK_M, 1] x cols [1, BLOCK_N] (loads under mask)."""
    if HAS_BIAS:
        acc += tl.load(B_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(R_ptr + rows * r_row_stride + cols * r_col_stride, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _line_columns(k, k_end, BLOCK_K: tl.constexpr, LINE: tl.constexpr):
    """One column in each LINE-column line of [k, k + BLOCK_K), every one before k_end (the last repeats)."""
    return tl.minimum(k + tl.arange(0, max(1, BLOCK_K // LINE)) * LINE, k_end - 1)


@triton.jit
def _prefetch_weight_slice(W_ptr, rows, w_row_stride, k_start, k_end, BLOCK_K: tl.constexpr):
    """L2 prefetch of weight[rows, k_start:k_end] (K contiguous), one address per L2 line."""
    LINE: tl.constexpr = max(1, L2_LINE_BYTES * 8 // W_ptr.dtype.element_ty.primitive_bitwidth)  # elements
    row_ptrs = W_ptr + rows.to(tl.int64)[:, None] * w_row_stride
    for k in range(k_start, k_end, BLOCK_K):
        prefetch_to_l2(row_ptrs + _line_columns(k, k_end, BLOCK_K, LINE)[None, :])


@triton.jit
def _linear_kernel(
    X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, Partial_ptr, M, N, K, k_split_size,
    x_row_stride, x_col_stride, w_row_stride, w_col_stride, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH_WEIGHT: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of x @ weight^T over the K range [pid_k * k_split_size, +k_split_size).

    X_ptr: x, [M, K] with strides (x_row_stride, x_col_stride). W_ptr: weight, [N, K] (nn.Linear
    layout) with strides (w_row_stride, w_col_stride). B_ptr: bias [N], contiguous (unused without
    HAS_BIAS). R_ptr: residual [M, N] with strides (r_row_stride, r_col_stride). Y_ptr: output
    [M, N], contiguous. Partial_ptr: fp32 [SPLIT_K, M, N] contiguous workspace; with SPLIT_K > 1
    the raw partial sums go there and _split_k_reduce_kernel applies the epilogue.
    EVEN_K: every split is a whole number of BLOCK_K steps, so K needs no mask. PDL: launched as a
    programmatic dependent launch (common.py). PREFETCH_WEIGHT (with PDL; weight K-contiguous): the
    program's weight slice is prefetched into L2 before waiting for the previous kernel, which the weight
    never depends on, so its trip from HBM overlaps that kernel.
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_split_size
    k_end = tl.minimum(K, k_start + k_split_size)
    if PREFETCH_WEIGHT:
        _prefetch_weight_slice(W_ptr, offs_n % N, w_row_stride, k_start, k_end, BLOCK_K)
    wait_previous_allow_next(PDL)  # nothing else is read or written before the previous kernel has ended

    # -- K loop: rows past M / columns past N wrap (their results are never stored); K is masked --
    x_ptrs = X_ptr + (offs_m % M).to(tl.int64)[:, None] * x_row_stride + (k_start + offs_k)[None, :] * x_col_stride
    w_ptrs = W_ptr + (offs_n % N).to(tl.int64)[None, :] * w_row_stride + (k_start + offs_k)[:, None] * w_col_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k + offs_k) < k_end
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = dot(x, w, acc, INPUT_PRECISION)
        x_ptrs += BLOCK_K * x_col_stride
        w_ptrs += BLOCK_K * w_col_stride

    # -- epilogue, or the raw partial sum when K is split --
    if SPLIT_K == 1:
        _epilogue(
            acc, offs_m, offs_n, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )  # fmt: skip
    else:
        rows, cols = offs_m.to(tl.int64)[:, None], offs_n[None, :]
        partial_ptrs = Partial_ptr + (pid_k * M + rows) * N + cols
        tl.store(partial_ptrs, acc, mask=(rows < M) & (cols < N))


@triton.jit
def _linear_persistent_kernel(
    x_desc, w_desc, B_ptr, R_ptr, Y_ptr, M, N, K, r_row_stride, r_col_stride,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Output tiles start, start + NUM_PROGRAMS, ... (grouped order) of x @ weight^T, each with the epilogue.

    x_desc: tensor descriptor of x [M, K], block [BLOCK_M, BLOCK_K]. w_desc: of weight [N, K],
    block [BLOCK_N, BLOCK_K]. Both need a contiguous last dimension and 16-byte aligned base and row
    stride; TMA zero-fills reads past M, N and K, so no masks. Other pointers as in _linear_kernel.
    NUM_PROGRAMS: the SM count times the programs per SM. PDL: as in _linear_kernel.
    Grid: (min(NUM_PROGRAMS, number of tiles),).
    """
    wait_previous_allow_next(PDL)  # nothing is read or written before the previous kernel has ended
    start = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    # the epilogue counts its tiles separately, as Triton's persistent-matmul tutorial does: values used
    # by both the loads and the epilogue have tripped the pipelining of the flattened loop
    epilogue_tile = start - NUM_PROGRAMS
    # -- flatten: the compiler fuses tile and K loops into one pipelined loop, prefetching across tiles --
    for tile in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = dot(x, w.T, acc, INPUT_PRECISION)

        epilogue_tile += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(epilogue_tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # -- epilogue in two column halves: half the registers for activation and residual (no spills) --
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _epilogue(
            acc0, offs_m, offs_n, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )  # fmt: skip
        _epilogue(
            acc1, offs_m, offs_n + BLOCK_N // 2, M, N, B_ptr, R_ptr, Y_ptr, r_row_stride, r_col_stride,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )  # fmt: skip


@triton.jit
def _split_k_reduce_kernel(
    Partial_ptr, B_ptr, R_ptr, Y_ptr, NW_ptr, NB_ptr, M, N, r_row_stride, r_col_stride, eps,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
    LAYER_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Sums the SPLIT_K partials [SPLIT_K, M, N] in a fixed order, in fp32, then applies the epilogue.

    Partial_ptr: contiguous, fp32 from a split _linear_kernel, or (SPLIT_K=1) one finished product in
    any float dtype (`linear_epilogue_fwd`). Other pointers as in _linear_kernel; Y_ptr may be
    Partial_ptr itself when SPLIT_K=1 (each element is read, then written, by the same program).
    LAYER_NORM: Y = layer_norm(epilogue result rounded to Y's dtype) over each row, as norm.py's kernel
    computes it on the stored sum (eps; NW_ptr, NB_ptr: norm weight and bias [N], contiguous, unused without
    HAS_NORM_WEIGHT / HAS_NORM_BIAS); needs BLOCK_N >= N, one program holding whole rows. PDL: as in
    _linear_kernel. Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    wait_previous_allow_next(PDL)  # nothing is read or written before the previous kernel has ended
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n[None, :]
    mask = (rows < M) & (cols < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(Partial_ptr + (split * M + rows) * N + cols, mask=mask, other=0.0)
    acc = _epilogue_values(acc, rows, cols, mask, N, B_ptr, R_ptr, r_row_stride, r_col_stride,
                           HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    if LAYER_NORM:
        h = tl.where(mask, cast(acc, Y_ptr.dtype.element_ty).to(tl.float32), 0.0)
        acc = layer_norm_rows(h, cols, mask, N, eps, NW_ptr, NB_ptr, HAS_NORM_WEIGHT, HAS_NORM_BIAS)
    tl.store(Y_ptr + rows * N + cols, cast(acc, Y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _device_limits(device: torch.device) -> tuple[int, int, bool]:
    """(SM count, shared-memory bytes a program's pipelined tiles may use, whether it has TMA)."""
    if device.type != "cuda":  # the interpreter emulates tensor descriptors with masked loads
        return INTERPRETER_SM_COUNT, SMEM_BUDGET, True
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 232448)
    return props.multi_processor_count, min(SMEM_BUDGET, optin * 7 // 8), props.major >= 9


def _tma_compatible(t: torch.Tensor) -> bool:
    """TMA reads 2-D tensors with a contiguous last dimension and a 16-byte aligned base and row stride."""
    row_bytes = t.stride(0) * t.element_size()
    return t.stride(1) == 1 and row_bytes % 16 == 0 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0


def _smem_bytes(config: LinearConfig, itemsize: int) -> int:
    return (config.block_m + config.block_n) * config.block_k * itemsize * config.num_stages


def _fit(config: LinearConfig, itemsize: int, smem_budget: int) -> LinearConfig:
    """Halves block_k for fp32 (same bytes per stage as 16-bit), then drops stages down to two and
    halves block_k down to 16 until the pipelined tiles fit the shared-memory budget (shared by the
    programs of one SM)."""
    config = dataclasses.replace(config, block_k=max(16, config.block_k * 2 // max(2, itemsize)))
    while _smem_bytes(config, itemsize) > smem_budget // config.programs_per_sm and config.block_k > 16:
        if config.num_stages > 2:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        else:
            config = dataclasses.replace(config, block_k=config.block_k // 2)
    return config


def _num_tiles(config: LinearConfig, M: int, N: int) -> int:
    return triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)


def _pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    return _pick_config_cached(M, N, K, dtype, device, dot_precision(dtype))


@functools.lru_cache(maxsize=4096)  # on every launch's path: computed once per shape, device and precision
def _pick_config_cached(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                        precision: str) -> LinearConfig:
    sm_count, smem_budget, has_tma = _device_limits(device)

    def cost(tile_and_efficiency):  # waves of programs times the work of one program
        tile, efficiency = tile_and_efficiency
        return triton.cdiv(_num_tiles(tile, M, N), sm_count) * tile.block_m * tile.block_n / efficiency

    tensor_core_tma = has_tma and precision != "ieee"
    if INTERPRETED:  # few, big blocks keep CPU tests fast; masks (or TMA bounds) still cover the edges
        block_k = min(128, max(16, triton.next_power_of_2(K)))
        tile = LinearConfig(16 if M <= SKINNY_MAX_M else 64, 64, block_k, group_m=4,
                            persistent=M > SKINNY_MAX_M and tensor_core_tma)
    elif M <= SKINNY_MAX_M:
        tile = _SKINNY if N >= 4096 else dataclasses.replace(_SKINNY, block_n=32)
    elif tensor_core_tma and _num_tiles(_PERSISTENT, M, N) >= sm_count:
        tile = _PERSISTENT  # enough tiles to fill every SM
    else:
        tile = min(_TILES, key=cost)[0]
    config, tiles = _fit(tile, dtype.itemsize, smem_budget), _num_tiles(tile, M, N)
    # split K while too few programs: decode splits while the programs still fit on the SMs at once
    # and each split keeps 8 K steps; larger M while under half the SMs are busy, 4 K steps a split
    k_steps = triton.cdiv(K, config.block_k)
    split_k = 1
    if M <= SKINNY_MAX_M:
        while tiles * split_k * 2 <= sm_count and k_steps >= 8 * split_k * 2:
            split_k *= 2
    elif tiles < sm_count // 2:
        while tiles * split_k < sm_count and k_steps >= 4 * split_k:
            split_k *= 2
    return dataclasses.replace(config, split_k=split_k, persistent=config.persistent and split_k == 1)


def linear_configs(M: int, dtype: torch.dtype = torch.float16) -> list[LinearConfig]:
    """Candidate configs for M rows of dtype, for benchmark sweeps (linear_fwd(..., config=))."""
    if M <= SKINNY_MAX_M:
        candidates = [
            LinearConfig(16, block_n, block_k, group_m=1, num_warps=warps, num_stages=stages, split_k=split)
            for block_n in (16, 32, 64, 128)
            for block_k in (128, 256, 512)
            for warps, stages in ((2, 4), (4, 4))
            for split in (1, 2, 4, 8)
        ]
    else:
        candidates = [dataclasses.replace(tile, split_k=split) for tile, _ in _TILES for split in (1, 2, 4)]
        candidates += [
            LinearConfig(128, 256, 64, num_warps=8, num_stages=4),
            LinearConfig(256, 128, 64, num_warps=8, num_stages=3),
            LinearConfig(128, 128, 32, num_warps=4, num_stages=5),
            LinearConfig(128, 64, 64, num_warps=4, num_stages=4),
        ]
        # the same tiles persistent (TMA loads), plus the usual Hopper picks
        candidates += [dataclasses.replace(tile, persistent=True) for tile, _ in _TILES]
        candidates += [
            LinearConfig(128, 256, 64, num_warps=8, num_stages=4, persistent=True),
            LinearConfig(128, 128, 64, num_warps=8, num_stages=3, persistent=True),
            LinearConfig(128, 128, 64, num_warps=8, num_stages=4, persistent=True),
            LinearConfig(128, 128, 128, num_warps=8, num_stages=3, persistent=True),
            LinearConfig(128, 256, 64, group_m=4, num_warps=8, num_stages=3, persistent=True),
            LinearConfig(128, 128, 64, num_warps=8, num_stages=3, persistent=True, programs_per_sm=2),
        ]
    return list(dict.fromkeys(_fit(config, dtype.itemsize, SMEM_BUDGET) for config in candidates))


def tuning_candidates(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> list[LinearConfig]:
    """What autotuning times for one shape: the heuristic's pick first, then the sweep's candidates
    (for decode sizes only the 4-warp ones with 128- or 256-wide K steps, the region the sweeps favour)."""
    candidates = linear_configs(M, dtype)
    if M <= SKINNY_MAX_M:
        candidates = [c for c in candidates if c.num_warps == 4 and c.block_k in (128, 256) and c.block_n >= 32]
    return list(dict.fromkeys([_pick_config(M, N, K, dtype, device), *candidates]))


def time_linear_configs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    candidates: list[LinearConfig],
) -> list[tuple[LinearConfig, float]]:
    """(config, median ms) of each candidate that compiles, timed on these tensors replayed from a CUDA
    graph (triton.testing.do_bench_cudagraph); configs that run out of shared memory or registers are left out."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    timed = []
    for config in candidates:
        def launch(config=config):
            linear_fwd(x, weight, bias, activation, residual, out=out, config=config)

        try:
            ms = triton.testing.do_bench_cudagraph(launch, rep=10, return_mode="median")
        except OutOfResources:
            continue
        timed.append((config, float(ms)))
    return timed


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    out: torch.Tensor | None = None,
    config: LinearConfig | None = None,
    layer_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
) -> torch.Tensor:
    """activation(x @ weight^T + bias) + residual as a contiguous [M, N] tensor in x's dtype.

    x: [M, K]; weight: [N, K]; bias: [N]; residual: [M, N]; any strides (validated by tritonize.ops).
    out: an optional contiguous [M, N] buffer to write. config: overrides the shape heuristic; a
    persistent config runs the tiled pointer kernel where x or weight cannot be read through TMA.
    layer_norm: (weight, bias, eps), contiguous [N] or None each: the result is layer-normalized in the
    split-K reduce (`linear_layer_norm_fwd`; the config must split K and N <= MAX_FUSED_NORM_COLS).
    """
    (M, K), N = x.shape, weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    config = config or _pick_config(M, N, K, x.dtype, x.device)
    if layer_norm is not None and not _norm_fits_the_reduce(config, N):
        raise ValueError(f"linear_fwd applies a layer norm only in a split-K reduce of rows of at most "
                         f"{MAX_FUSED_NORM_COLS} columns, got split_k={config.split_k}, N={N}")
    bias = None if bias is None else bias.contiguous()
    res_strides = (0, 0) if residual is None else residual.stride()
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RESIDUAL=residual is not None)
    precision, pdl = dot_precision(x.dtype), pdl_supported(x.device)
    sm_count, _, has_tma = _device_limits(x.device)
    if config.persistent and has_tma and _tma_compatible(x) and _tma_compatible(weight):
        x_desc = TensorDescriptor.from_tensor(x, [config.block_m, config.block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])
        programs = sm_count * config.programs_per_sm
        _linear_persistent_kernel[(min(programs, _num_tiles(config, M, N)),)](
            x_desc, w_desc, bias, residual, out, M, N, K, *res_strides, **flags, INPUT_PRECISION=precision,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            NUM_PROGRAMS=programs, PDL=pdl, num_warps=config.num_warps, num_stages=config.num_stages,
            launch_pdl=pdl,
        )  # fmt: skip
        return out
    partial = out
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
    k_split_size = triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k
    grid = (_num_tiles(config, M, N), config.split_k)
    _linear_kernel[grid](
        x, weight, bias, residual, out, partial, M, N, K, k_split_size,
        *x.stride(), *weight.stride(), *res_strides,
        **flags, SPLIT_K=config.split_k, INPUT_PRECISION=precision, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=K % (config.block_k * config.split_k) == 0, PDL=pdl,
        PREFETCH_WEIGHT=pdl and weight.stride(1) == 1 and M <= PREFETCH_WEIGHT_MAX_M,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    if config.split_k > 1:
        _reduce_and_epilogue(partial, bias, activation, residual, out, config.split_k, layer_norm)
    return out


def _reduce_and_epilogue(partial, bias, activation, residual, out, split_k: int, layer_norm=None) -> None:
    """The split-K reduce kernel over partial into out; layer_norm: None or (weight, bias, eps) applied to
    whole rows (one program per row block, rows grouped as norm.py's kernels group them)."""
    M, N = out.shape
    if layer_norm is None:
        block_n = 256 if INTERPRETED else 64  # the interpreter pays per program
        block_m, num_warps = min(16, triton.next_power_of_2(M)), 4  # many small programs: bandwidth-bound
        norm_weight, norm_bias, eps = None, None, 0.0
    else:
        block_n, block_m, num_warps = norm_launch_config(M, N)
        norm_weight, norm_bias, eps = layer_norm
    res_strides = (0, 0) if residual is None else residual.stride()
    pdl = pdl_supported(out.device)
    _split_k_reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        partial, bias, residual, out, norm_weight, norm_bias, M, N, *res_strides, float(eps),
        HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RESIDUAL=residual is not None,
        SPLIT_K=split_k, LAYER_NORM=layer_norm is not None, HAS_NORM_WEIGHT=norm_weight is not None,
        HAS_NORM_BIAS=norm_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl,
    )  # fmt: skip


def _norm_fits_the_reduce(config: LinearConfig, N: int) -> bool:
    """Whether linear_fwd can layer-normalize in this config's split-K reduce: K is split (so a reduce kernel
    runs) and one program can hold rows of N columns."""
    return config.split_k > 1 and N <= MAX_FUSED_NORM_COLS


def linear_layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """layer_norm(x @ weight^T + bias + residual) as a contiguous [M, N] tensor in x's dtype; the sum is
    rounded to x's dtype before the norm, as if stored (the numerics of linear_fwd then layer_norm_fwd).

    Where the config splits K (few output tiles: decode and short sequences) and rows have at most
    MAX_FUSED_NORM_COLS columns, the split-K reduce kernel applies the epilogue and the norm, one launch
    instead of two; otherwise linear_fwd then layer_norm_fwd. Operands as in linear_fwd and layer_norm_fwd;
    config overrides the shape heuristic.
    """
    (M, K), N = x.shape, weight.shape[0]
    config = config or _pick_config(M, N, K, x.dtype, x.device)
    if not _norm_fits_the_reduce(config, N):
        product = linear_fwd(x, weight, bias, None, residual, config=config)
        return layer_norm_fwd(product, norm_weight, norm_bias, eps)[0]
    norm = (None if norm_weight is None else norm_weight.contiguous(),
            None if norm_bias is None else norm_bias.contiguous(), eps)
    return linear_fwd(x, weight, bias, None, residual, config=config, layer_norm=norm)


def linear_epilogue_fwd(
    product: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """activation(product + bias) + residual in fp32, stored in out's dtype: the epilogue of a matmul done
    elsewhere (tritonize.ops runs cuBLAS's where tuning measured it faster than every tiled config).

    product: a contiguous [M, N] tensor in any float dtype; bias: [N]; residual: [M, N], any strides.
    out: a contiguous [M, N] buffer (product itself for in place); None: a new one in product's dtype.
    """
    if not product.is_contiguous():
        raise ValueError("linear_epilogue_fwd needs a contiguous product")
    if out is None:
        out = torch.empty_like(product)
    if product.numel() == 0:
        return out
    _reduce_and_epilogue(product, None if bias is None else bias.contiguous(), activation, residual, out, 1)
    return out

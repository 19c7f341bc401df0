"""Rotary position embeddings applied to q and k in one launch, half-rotation (Llama/NeoX) or interleaved (GPT-J).

Each program rotates a block of whole head rows of q or of k (the grid covers both) in fp32 and writes new
tensors; dims past rotary_dim pass through (partial rotary). The decoding variant, rotary_cache_write_fwd,
also covers v's rows in the same launch and stores k's and v's straight into preallocated KV caches at each
sequence's own position. Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import INTERPRETED, cast, pdl_supported, wait_previous_allow_next
from tritonize.kernels.norm import launch_config

ROTARY_ELEMENTS_PER_PROGRAM = 4096  # per program on the GPU, as measured for decode (docs/kernels.md)
INTERPRETER_ELEMENTS_PER_PROGRAM = 2**16  # few, big programs keep CPU tests fast


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    """Head rows per program (a power of two) and warps."""

    rows_per_program: int
    num_warps: int = 4


@triton.jit
def _head_rows(block, n_rows, heads, seq, ROWS: tl.constexpr):
    """Rows block * ROWS onward of a [batch, heads, seq, head_dim] tensor flattened in that order:
    (row indices, their batch, head and sequence indices, whether each row exists)."""
    rows = block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return rows, rows // seq // heads, rows // seq % heads, rows % seq, rows < n_rows


@triton.jit
def _load_rotated(
    X_ptr, Cos_ptr, Sin_ptr, b, h, s, row_exists, head_dim, rotary_dim,
    x_stride_b, x_stride_h, x_stride_s, x_stride_d, c_stride_b, c_stride_s, c_stride_d,
    ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows x[b, h, s, :] as an fp32 [rows, BLOCK_D] tile (0 past head_dim and for missing rows); with
    ROTATE, x * cos + rotate(x) * sin at cos/sin[b, s] over the first rotary_dim dims, x after."""
    cols = tl.arange(0, BLOCK_D)
    mask = row_exists[:, None] & (cols < head_dim)[None, :]
    x_row = (b * x_stride_b + h * x_stride_h + s * x_stride_s)[:, None]
    x = tl.load(X_ptr + x_row + cols[None, :] * x_stride_d, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        rotated = mask & (cols < rotary_dim)[None, :]
        # -- the partner of each rotated dim, and whether it enters negated: rotate(x)[i] = -+x[partner(i)] --
        if INTERLEAVED:  # pairs (2i, 2i + 1)
            partner = cols ^ 1
            first = (cols & 1) == 0
        else:  # halves: rotate_half(x) = cat(-x2, x1)
            half = rotary_dim // 2
            first = cols < half
            partner = tl.where(first, cols + half, cols - half)
        x_partner = tl.load(X_ptr + x_row + partner[None, :] * x_stride_d, mask=rotated, other=0.0).to(tl.float32)
        c_offsets = (b * c_stride_b + s * c_stride_s)[:, None] + cols[None, :] * c_stride_d
        cos = tl.load(Cos_ptr + c_offsets, mask=rotated, other=0.0).to(tl.float32)
        sin = tl.load(Sin_ptr + c_offsets, mask=rotated, other=0.0).to(tl.float32)
        x = tl.where(rotated, x * cos + tl.where(first[None, :], -x_partner, x_partner) * sin, x)
    return x


@triton.jit
def _rotate_rows(
    X_ptr, Y_ptr, Cos_ptr, Sin_ptr, block, n_rows, heads, seq, head_dim, rotary_dim,
    x_stride_b, x_stride_h, x_stride_s, x_stride_d, c_stride_b, c_stride_s, c_stride_d,
    INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows block * ROWS onward of x [batch, heads, seq, head_dim] rotated into Y, contiguous in the same shape."""
    rows, b, h, s, row_exists = _head_rows(block, n_rows, heads, seq, ROWS)
    y = _load_rotated(
        X_ptr, Cos_ptr, Sin_ptr, b, h, s, row_exists, head_dim, rotary_dim,
        x_stride_b, x_stride_h, x_stride_s, x_stride_d, c_stride_b, c_stride_s, c_stride_d,
        True, INTERLEAVED, BLOCK_D,
    )  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    mask = row_exists[:, None] & (cols < head_dim)[None, :]
    tl.store(Y_ptr + rows[:, None] * head_dim + cols[None, :], cast(y, Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_cache_rows(
    X_ptr, Cache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr, block, n_rows, heads, seq, head_dim, rotary_dim, cache_len,
    x_stride_b, x_stride_h, x_stride_s, x_stride_d, cache_stride_b, cache_stride_h, cache_stride_s,
    c_stride_b, c_stride_s, c_stride_d,
    ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows block * ROWS onward of x [batch, heads, seq, head_dim] (rotated when ROTATE) into Cache
    [cache_batch, heads, cache_len, head_dim] (unit last stride): x[b, h, s] at position offsets[b] + s.
    Positions outside [0, cache_len) are not written (the caller's bug, but never a write out of bounds)."""
    rows, b, h, s, row_exists = _head_rows(block, n_rows, heads, seq, ROWS)
    y = _load_rotated(
        X_ptr, Cos_ptr, Sin_ptr, b, h, s, row_exists, head_dim, rotary_dim,
        x_stride_b, x_stride_h, x_stride_s, x_stride_d, c_stride_b, c_stride_s, c_stride_d,
        ROTATE, INTERLEAVED, BLOCK_D,
    )  # fmt: skip
    position = tl.load(Offsets_ptr + b, mask=row_exists, other=0).to(tl.int64) + s
    row_written = row_exists & (position >= 0) & (position < cache_len)
    cols = tl.arange(0, BLOCK_D)
    row_start = b * cache_stride_b + h * cache_stride_h + position * cache_stride_s
    mask = row_written[:, None] & (cols < head_dim)[None, :]
    tl.store(Cache_ptr + row_start[:, None] + cols[None, :], cast(y, Cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q_ptr, K_ptr, QO_ptr, KO_ptr, Cos_ptr, Sin_ptr, q_rows, k_rows, heads, kv_heads, seq, head_dim, rotary_dim,
    q_stride_b, q_stride_h, q_stride_s, q_stride_d, k_stride_b, k_stride_h, k_stride_s, k_stride_d,
    c_stride_b, c_stride_s, c_stride_d,
    INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Programs [0, cdiv(q_rows, ROWS)) rotate q's rows, the rest k's.

    Q_ptr: q [batch, heads, seq, head_dim], K_ptr: k [batch, kv_heads, seq, head_dim], any strides.
    QO_ptr, KO_ptr: contiguous outputs of the same shapes. Cos_ptr, Sin_ptr: [batch or 1, seq, rotary_dim]
    with strides (c_stride_b, c_stride_s, c_stride_d), c_stride_b = 0 when shared over the batch.
    Grid: (cdiv(q_rows, ROWS) + cdiv(k_rows, ROWS),).
    """
    block = tl.program_id(0)
    q_blocks = tl.cdiv(q_rows, ROWS)
    if block < q_blocks:
        _rotate_rows(
            Q_ptr, QO_ptr, Cos_ptr, Sin_ptr, block, q_rows, heads, seq, head_dim, rotary_dim,
            q_stride_b, q_stride_h, q_stride_s, q_stride_d, c_stride_b, c_stride_s, c_stride_d,
            INTERLEAVED, ROWS, BLOCK_D,
        )  # fmt: skip
    else:
        _rotate_rows(
            K_ptr, KO_ptr, Cos_ptr, Sin_ptr, block - q_blocks, k_rows, kv_heads, seq, head_dim, rotary_dim,
            k_stride_b, k_stride_h, k_stride_s, k_stride_d, c_stride_b, c_stride_s, c_stride_d,
            INTERLEAVED, ROWS, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _rotary_cache_write_kernel(
    Q_ptr, K_ptr, V_ptr, QO_ptr, KCache_ptr, VCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr,
    q_rows, kv_rows, heads, kv_heads, seq, head_dim, rotary_dim, cache_len,
    q_stride_b, q_stride_h, q_stride_s, q_stride_d, k_stride_b, k_stride_h, k_stride_s, k_stride_d,
    v_stride_b, v_stride_h, v_stride_s, v_stride_d, cache_stride_b, cache_stride_h, cache_stride_s,
    c_stride_b, c_stride_s, c_stride_d,
    ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs [0, cdiv(q_rows, ROWS)) rotate q's rows into QO, the next cdiv(kv_rows, ROWS) write k's rows
    (rotated when ROTATE) into the k cache, the rest copy v's rows into the v cache.

    Q_ptr: q [batch, heads, seq, head_dim], K_ptr, V_ptr: [batch, kv_heads, seq, head_dim], any strides.
    QO_ptr: contiguous output like q. KCache_ptr, VCache_ptr: [cache_batch, kv_heads, cache_len, head_dim]
    with the same strides, the last one 1. Offsets_ptr: [batch], the cache position of each sequence's
    token 0. Cos_ptr, Sin_ptr as in _rotary_kernel. Without ROTATE, q_rows is 0 and q, QO, cos, sin unused.
    PDL: a programmatic dependent launch (common.py), waiting for the previous kernel before any access.
    Grid: (cdiv(q_rows, ROWS) + 2 * cdiv(kv_rows, ROWS),).
    """
    wait_previous_allow_next(PDL)
    block = tl.program_id(0)
    q_blocks = tl.cdiv(q_rows, ROWS)
    kv_blocks = tl.cdiv(kv_rows, ROWS)
    if block < q_blocks:
        if ROTATE:
            _rotate_rows(
                Q_ptr, QO_ptr, Cos_ptr, Sin_ptr, block, q_rows, heads, seq, head_dim, rotary_dim,
                q_stride_b, q_stride_h, q_stride_s, q_stride_d, c_stride_b, c_stride_s, c_stride_d,
                INTERLEAVED, ROWS, BLOCK_D,
            )  # fmt: skip
    elif block < q_blocks + kv_blocks:
        _write_cache_rows(
            K_ptr, KCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr, block - q_blocks, kv_rows, kv_heads, seq, head_dim,
            rotary_dim, cache_len, k_stride_b, k_stride_h, k_stride_s, k_stride_d,
            cache_stride_b, cache_stride_h, cache_stride_s, c_stride_b, c_stride_s, c_stride_d,
            ROTATE, INTERLEAVED, ROWS, BLOCK_D,
        )  # fmt: skip
    else:
        _write_cache_rows(
            V_ptr, VCache_ptr, Cos_ptr, Sin_ptr, Offsets_ptr, block - q_blocks - kv_blocks, kv_rows, kv_heads, seq,
            head_dim, rotary_dim, cache_len, v_stride_b, v_stride_h, v_stride_s, v_stride_d,
            cache_stride_b, cache_stride_h, cache_stride_s, c_stride_b, c_stride_s, c_stride_d,
            False, INTERLEAVED, ROWS, BLOCK_D,
        )  # fmt: skip


def default_config(n_rows: int, head_dim: int) -> RotaryConfig:
    """About 4096 elements per program on the GPU (norm.launch_config's rule with the grouping rotary was
    measured with), far more under the interpreter."""
    block_d, rows, num_warps = launch_config(n_rows, head_dim, ROTARY_ELEMENTS_PER_PROGRAM)
    if INTERPRETED:
        rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, INTERPRETER_ELEMENTS_PER_PROGRAM // block_d))
    return RotaryConfig(rows, num_warps)


def rotary_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: RotaryConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated, as new contiguous tensors in their dtype (see reference.rotary for the layouts).

    q: [batch, heads, seq, head_dim]; k: [batch, kv_heads, seq, head_dim]; cos, sin: [batch or 1, seq,
    rotary_dim] with the same strides; any strides (validated by tritonize.ops). out: optional contiguous
    (q_out, k_out) buffers. config: overrides the rows per program.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    q_out, k_out = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                                torch.empty_like(k, memory_format=torch.contiguous_format))
    q_rows, k_rows = batch * heads * seq, batch * kv_heads * seq
    if q_rows + k_rows == 0:
        return q_out, k_out
    if sin.stride() != cos.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    config = config or default_config(max(q_rows, k_rows), head_dim)
    rows = config.rows_per_program
    c_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    grid = (triton.cdiv(q_rows, rows) + triton.cdiv(k_rows, rows),)
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin, q_rows, k_rows, heads, kv_heads, seq, head_dim, cos.shape[2],
        *q.stride(), *k.stride(), c_stride_b, cos.stride(1), cos.stride(2),
        INTERLEAVED=interleaved, ROWS=rows, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=config.num_warps,
    )  # fmt: skip
    return q_out, k_out


def rotary_cache_write_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_offsets: torch.Tensor,
    interleaved: bool,
    q_out: torch.Tensor | None = None,
    config: RotaryConfig | None = None,
) -> torch.Tensor | None:
    """Writes k (rotated) and v into the caches at write_offsets[b] + s; returns q rotated (None without cos/sin).

    q, k, v, cos, sin as rotary_fwd takes them, or cos = sin = None: nothing rotated. k_cache, v_cache:
    contiguous [cache_batch >= batch, kv_heads, cache_len, head_dim], written in place; positions outside
    [0, cache_len) are skipped. write_offsets: int32 or int64 [batch], read on the device only (validated by
    tritonize.ops). q_out: optional contiguous buffer for the rotated q. config: overrides the rows per program.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    rotate = cos is not None
    if rotate and q_out is None:
        q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    q_rows, kv_rows = batch * heads * seq if rotate else 0, batch * kv_heads * seq
    if kv_rows == 0:
        return q_out
    if rotate and sin.stride() != cos.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    config = config or default_config(max(q_rows, kv_rows), head_dim)
    rows = config.rows_per_program
    c_strides = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2)) if rotate else (0, 0, 0)
    grid = (triton.cdiv(q_rows, rows) + 2 * triton.cdiv(kv_rows, rows),)
    _rotary_cache_write_kernel[grid](
        q, k, v, q_out, k_cache, v_cache, cos, sin, write_offsets,
        q_rows, kv_rows, heads, kv_heads, seq, head_dim, cos.shape[2] if rotate else 0, k_cache.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride()[:3], *c_strides,
        ROTATE=rotate, INTERLEAVED=interleaved, ROWS=rows, BLOCK_D=triton.next_power_of_2(head_dim),
        PDL=pdl_supported(k.device), num_warps=config.num_warps, launch_pdl=pdl_supported(k.device),
    )  # fmt: skip
    return q_out

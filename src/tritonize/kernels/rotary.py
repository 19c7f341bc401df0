"""Rotary position embeddings applied to q and k in one launch, half-rotation (Llama/NeoX) or interleaved (GPT-J).

Each program rotates a block of whole head rows of q or of k (the grid covers both) in fp32 and writes new
tensors; dims past rotary_dim pass through (partial rotary). Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import INTERPRETED, cast
from tritonize.kernels.norm import launch_config

INTERPRETER_ELEMENTS_PER_PROGRAM = 2**16  # few, big programs keep CPU tests fast


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    """Head rows per program (a power of two) and warps."""

    rows_per_program: int
    num_warps: int = 4


@triton.jit
def _rotate_rows(
    X_ptr, Y_ptr, Cos_ptr, Sin_ptr, block, n_rows, heads, seq, head_dim, rotary_dim,
    x_stride_b, x_stride_h, x_stride_s, x_stride_d, c_stride_b, c_stride_s, c_stride_d,
    INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows block * ROWS onward of x [batch, heads, seq, head_dim] (flattened in that order), rotated into
    Y, contiguous in the same shape: y = x * cos + rotate(x) * sin over the first rotary_dim dims, x after."""
    rows = block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    s = rows % seq
    b = rows // seq // heads
    h = rows // seq % heads
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    rotated = mask & (cols < rotary_dim)[None, :]
    # -- the partner of each rotated dim, and whether it enters negated: rotate(x)[i] = -+x[partner(i)] --
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        partner = cols ^ 1
        first = (cols & 1) == 0
    else:  # halves: rotate_half(x) = cat(-x2, x1)
        half = rotary_dim // 2
        first = cols < half
        partner = tl.where(first, cols + half, cols - half)
    x_row = (b * x_stride_b + h * x_stride_h + s * x_stride_s)[:, None]
    x = tl.load(X_ptr + x_row + cols[None, :] * x_stride_d, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(X_ptr + x_row + partner[None, :] * x_stride_d, mask=rotated, other=0.0).to(tl.float32)
    c_offsets = (b * c_stride_b + s * c_stride_s)[:, None] + cols[None, :] * c_stride_d
    cos = tl.load(Cos_ptr + c_offsets, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.load(Sin_ptr + c_offsets, mask=rotated, other=0.0).to(tl.float32)
    y = tl.where(rotated, x * cos + tl.where(first[None, :], -x_partner, x_partner) * sin, x)
    tl.store(Y_ptr + rows[:, None] * head_dim + cols[None, :], cast(y, Y_ptr.dtype.element_ty), mask=mask)


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


def default_config(n_rows: int, head_dim: int) -> RotaryConfig:
    """About 4096 elements per program on the GPU (norm.launch_config's rule), far more under the interpreter."""
    block_d, rows, num_warps = launch_config(n_rows, head_dim)
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

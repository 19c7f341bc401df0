"""Decode attention (flash-decoding) in Triton: 1 to 16 new query tokens against a preallocated KV cache.

One program takes the query rows of every head of one kv head group (so GQA/MQA load K/V once per
group) over one split of a sequence's keys and writes a partial (out, lse); a second kernel merges the
splits. Lengths are read from device memory, so one CUDA graph serves every step. Must never import
torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import (
    INTERPRETED,
    cast,
    dot,
    dot_precision,
    pdl_supported,
    wait_previous_allow_next,
)

LOG2E = math.log2(math.e)
MAX_SPLITS = 64
# a full cache is never cut into splits of fewer keys than this (batch-1 Llama 1.7 GB on an H100: 64 beat 256 by 1.5%)
MIN_SPLIT_KEYS = 64
TARGET_WAVES = 2  # programs per SM the split count aims at


@dataclass(frozen=True)
class DecodeAttentionConfig:
    block_n: int  # keys per loop step
    max_rows: int  # query rows (heads of a group x q_len) per program, a power of 2 >= 16
    num_splits: int | None  # None: from the shapes (`default_num_splits`)
    num_warps: int
    num_stages: int


@triton.jit
def _fold_keys(
    acc, l_i, m_i, q, k_base, v_base,
    k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride,
    offs_d, pos, lo, hi, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Folds keys [lo, hi) into (acc, l_i, m_i); MASKED adds the end-of-range and causal masks."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_ptrs = k_base + offs_n[None, :] * k_seq_stride + offs_d[:, None] * k_dim_stride
        v_ptrs = v_base + offs_n[:, None] * v_seq_stride + offs_d[None, :] * v_dim_stride
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        qk = dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION)
        if MASKED:  # query row r sits at position pos[r] and sees keys j <= pos[r]
            qk = tl.where(n_ok[None, :] & (offs_n[None, :] <= pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)  # scale > 0, so max commutes with it
        m_safe = m_new
        if MASKED:  # a row may have seen no key yet: keep it at zero
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale_log2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_attention_kernel(
    Q_ptr, K_ptr, V_ptr, Seqlens_ptr, KeyStart_ptr, Out_ptr, PartOut_ptr, PartLse_ptr,
    q_batch_stride, q_head_stride, q_seq_stride, q_dim_stride,
    k_batch_stride, k_head_stride, k_seq_stride, k_dim_stride,
    v_batch_stride, v_head_stride, v_seq_stride, v_dim_stride,
    out_batch_stride, out_head_stride, out_seq_stride,
    kv_heads, group, q_len, max_len, num_splits, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_START: tl.constexpr, DIRECT: tl.constexpr, INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Attention of BLOCK_M stacked (head, query) rows of one kv head group over one split of the keys.

    Q_ptr: [batch, heads, q_len, HEAD_DIM]; K_ptr, V_ptr: [batch, kv_heads, max_len, HEAD_DIM];
    Seqlens_ptr / KeyStart_ptr: int32 [batch], one past the last and the first valid key. Row r of the
    group is head kv_head * group + r // q_len, query r % q_len, at position seqlen - q_len + r % q_len.
    DIRECT (one split): writes Out_ptr [batch, heads, q_len, HEAD_DIM] (last dim contiguous). Otherwise
    writes fp32 PartOut_ptr [batch * heads * q_len, num_splits, HEAD_DIM] and PartLse_ptr
    [batch * heads * q_len, num_splits] (log2 domain, -inf where the row saw no key).
    PDL: a programmatic dependent launch (common.py), waiting for the previous kernel before any access.
    """
    wait_previous_allow_next(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group_rows = group * q_len
    m_blocks = tl.cdiv(group_rows, BLOCK_M)
    off_bkv = pid // m_blocks
    off_b = (off_bkv // kv_heads).to(tl.int64)
    off_kv_h = (off_bkv % kv_heads).to(tl.int64)
    rows = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group_rows
    head = off_kv_h * group + rows // q_len
    qi = rows % q_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_rd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    # -- this sequence's keys [key_lo, seqlen), cut into num_splits parts of whole blocks --
    seqlen = tl.minimum(tl.maximum(tl.load(Seqlens_ptr + off_b), 0), max_len)  # > max_len: caller's bug
    key_lo = 0
    if HAS_KEY_START:
        key_lo = tl.minimum(tl.maximum(tl.load(KeyStart_ptr + off_b), 0), seqlen)
    split_len = tl.cdiv(tl.cdiv(seqlen - key_lo, num_splits), BLOCK_N) * BLOCK_N
    lo = key_lo + split * split_len
    hi = tl.minimum(lo + split_len, seqlen)  # lo >= hi: an empty split, written as "no key"
    # keys up to seqlen - q_len are visible to every row: whole blocks of them need no mask
    mid = lo + tl.maximum(tl.minimum(hi, seqlen - q_len + 1) - lo, 0) // BLOCK_N * BLOCK_N
    pos = seqlen - q_len + qi

    q_ptrs = Q_ptr + off_b * q_batch_stride + head[:, None] * q_head_stride + qi[:, None] * q_seq_stride
    q = tl.load(q_ptrs + offs_d[None, :] * q_dim_stride, mask=mask_rd, other=0.0)
    k_base = K_ptr + off_b * k_batch_stride + off_kv_h * k_head_stride
    v_base = V_ptr + off_b * v_batch_stride + off_kv_h * v_head_stride

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _fold_keys(
        acc, l_i, m_i, q, k_base, v_base, k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride,
        offs_d, pos, lo, mid, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, INPUT_PRECISION,
    )
    acc, l_i, m_i = _fold_keys(
        acc, l_i, m_i, q, k_base, v_base, k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride,
        offs_d, pos, mid, hi, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, INPUT_PRECISION,
    )

    # -- rows that saw no key keep acc == 0: zeros (and lse = -inf, weight 0 in the merge) --
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DIRECT:
        out_ptrs = Out_ptr + off_b * out_batch_stride + head[:, None] * out_head_stride + qi[:, None] * out_seq_stride
        tl.store(out_ptrs + offs_d[None, :], cast(out, Out_ptr.dtype.element_ty), mask=mask_rd)
    else:
        part = ((off_b * kv_heads + off_kv_h) * group_rows + rows) * num_splits + split
        tl.store(PartOut_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_rd)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(PartLse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartOut_ptr, PartLse_ptr, Out_ptr,
    out_batch_stride, out_head_stride, out_seq_stride,
    heads, q_len, n_rows, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    """Out = sum_s 2^lse_s PartOut_s / sum_s 2^lse_s for BLOCK_R rows, the splits in order (deterministic)."""
    wait_previous_allow_next(PDL)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask_rd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for split in range(0, num_splits):
        part = rows * num_splits + split
        lse = tl.load(PartLse_ptr + part, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        weight = tl.math.exp2(lse - m_safe)
        partial = tl.load(PartOut_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_rd, other=0.0)
        acc = acc * alpha[:, None] + weight[:, None] * partial
        l_i = l_i * alpha + weight
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    off_b = rows // (heads * q_len)
    off_h = (rows // q_len) % heads
    off_q = rows % q_len
    out_ptrs = Out_ptr + off_b * out_batch_stride + off_h * out_head_stride + off_q * out_seq_stride
    tl.store(out_ptrs[:, None] + offs_d[None, :], cast(out, Out_ptr.dtype.element_ty), mask=mask_rd)


def default_config(head_dim: int, dtype: torch.dtype) -> DecodeAttentionConfig:
    """Block sizes by head_dim and dtype; one split and large blocks under the interpreter."""
    if INTERPRETED:
        return DecodeAttentionConfig(block_n=128, max_rows=128, num_splits=1, num_warps=4, num_stages=1)
    wide = head_dim > 128
    if dtype == torch.float32:
        return DecodeAttentionConfig(block_n=32, max_rows=32 if wide else 64, num_splits=None, num_warps=4,
                                     num_stages=2)
    return DecodeAttentionConfig(block_n=32 if wide else 64, max_rows=32 if wide else 64, num_splits=None,
                                 num_warps=4, num_stages=3)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100's count: CPU runs only exercise the same host logic
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(programs: int, max_len: int, device: torch.device) -> int:
    """Splits of the key range so that programs x splits fill TARGET_WAVES programs per SM.

    A fixed function of static shapes (never of the lengths, which stay on the device), each split of
    a full cache keeping at least MIN_SPLIT_KEYS keys.
    """
    wanted = triton.cdiv(TARGET_WAVES * _sm_count(device), programs)
    return max(1, min(wanted, max_len // MIN_SPLIT_KEYS, MAX_SPLITS))


def decode_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: DecodeAttentionConfig | None = None,
) -> torch.Tensor:
    """Launches the kernels; arguments as in `tritonize.ops.decode_attention` (validated there)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    config = config or default_config(head_dim, q.dtype)
    group = heads // kv_heads
    block_m = min(config.max_rows, max(16, triton.next_power_of_2(group * q_len)))
    programs = batch * kv_heads * triton.cdiv(group * q_len, block_m)
    num_splits = config.num_splits or default_num_splits(programs, max_len, q.device)
    direct = num_splits == 1
    if direct:  # the kernel never touches the workspace: any tensor stands in
        part_out = part_lse = out
    else:
        part_out = torch.empty((batch * heads * q_len, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch * heads * q_len, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    pdl = pdl_supported(q.device)

    _decode_attention_kernel[(programs, num_splits)](
        q, k_cache, v_cache, cache_seqlens, cache_seqlens if key_start is None else key_start,
        out, part_out, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride()[:3],
        kv_heads, group, q_len, max_len, num_splits, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=config.block_n,
        HAS_KEY_START=key_start is not None, DIRECT=direct, INPUT_PRECISION=dot_precision(q.dtype), PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if not direct:
        n_rows = batch * heads * q_len
        block_r = 64 if INTERPRETED else 16
        _merge_splits_kernel[(triton.cdiv(n_rows, block_r),)](
            part_out, part_lse, out, *out.stride()[:3], heads, q_len, n_rows, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return out

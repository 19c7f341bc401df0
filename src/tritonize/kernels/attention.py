"""Flash attention forward (FlashAttention-2 style online softmax) in Triton.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys and values of its
kv head in BLOCK_N blocks, so the [q_len, kv_len] score matrix never reaches memory. Handles GQA/MQA,
causal masks aligned to the end, key-padding masks (whose fully padded blocks are skipped), an
additive bias and any head_dim up to 256. Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@triton.jit
def _attend_key_range(
    acc, l_i, m_i, q,
    k_base, v_base, bias_base, kpm_base,
    k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride,
    bias_q_stride, bias_kv_stride, kpm_stride,
    offs_m, offs_d, lo, hi, q_len, kv_len, causal_offset, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_EDGES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Folds keys [lo, hi) into the running (acc, l_i, m_i); MASK_EDGES adds kv-end and causal masks."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        # -- scores of this block, in the log2 domain --
        k_ptrs = k_base + offs_n[None, :] * k_seq_stride + offs_d[:, None] * k_dim_stride
        if MASK_EDGES:
            k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        # (without a bias the scale is applied later, fused into the exponent's subtraction)
        qk = dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION)
        qk_scale = scale_log2
        if HAS_BIAS:
            bias_ptrs = bias_base + offs_m[:, None] * bias_q_stride + offs_n[None, :] * bias_kv_stride
            bias = tl.load(bias_ptrs, mask=(offs_m[:, None] < q_len) & n_ok[None, :], other=0.0)
            qk = qk * scale_log2 + bias.to(tl.float32) * 1.4426950408889634
            qk_scale = 1.0
        if HAS_KPM:
            attend = tl.load(kpm_base + offs_n * kpm_stride, mask=n_ok, other=0) != 0
            qk = tl.where(attend[None, :], qk, float("-inf"))
        if MASK_EDGES:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(visible, qk, float("-inf"))
        # -- online softmax: rescale what came before to the new row maximum --
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # scale > 0, so max commutes with it
        m_safe = m_new
        if HAS_BIAS or HAS_KPM or MASK_EDGES:  # a row may have no visible key yet: keep it at zero
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # -- accumulate p @ v --
        v_ptrs = v_base + offs_n[:, None] * v_seq_stride + offs_d[None, :] * v_dim_stride
        if MASK_EDGES:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, Bias_ptr, Kpm_ptr,
    q_batch_stride, q_head_stride, q_seq_stride, q_dim_stride,
    k_batch_stride, k_head_stride, k_seq_stride, k_dim_stride,
    v_batch_stride, v_head_stride, v_seq_stride, v_dim_stride,
    out_batch_stride, out_head_stride, out_seq_stride,
    bias_batch_stride, bias_head_stride, bias_q_stride, bias_kv_stride,
    kpm_batch_stride, kpm_stride,
    heads, kv_group, q_len, kv_len, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Out[b, h, m, :] = softmax(Q K^T * scale + Bias, masked) V for BLOCK_M rows m of one (b, h).

    Q_ptr: [batch, heads, q_len, HEAD_DIM]; K_ptr, V_ptr: [batch, heads // kv_group, kv_len, HEAD_DIM];
    Out_ptr: [batch, heads, q_len, HEAD_DIM] (last dim contiguous); Bias_ptr: [batch, heads, q_len,
    kv_len] with zero strides where broadcast; Kpm_ptr: uint8 [batch, kv_len], nonzero = attend.
    Out may be a permuted view (e.g. [batch, q_len, heads, HEAD_DIM] memory). All strides are in
    elements. scale_log2 is scale * log2(e). PDL: launched as a programmatic dependent launch (waits for
    the previous kernel before reading anything).
    """
    wait_previous_allow_next(PDL)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // heads).to(tl.int64)
    off_h = (off_bh % heads).to(tl.int64)
    off_kv_h = off_h // kv_group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # -- load the query block once --
    q_base = Q_ptr + off_b * q_batch_stride + off_h * q_head_stride
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * q_seq_stride + offs_d[None, :] * q_dim_stride, mask=q_mask, other=0.0)

    k_base = K_ptr + off_b * k_batch_stride + off_kv_h * k_head_stride
    v_base = V_ptr + off_b * v_batch_stride + off_kv_h * v_head_stride
    bias_base = Bias_ptr + off_b * bias_batch_stride + off_h * bias_head_stride
    kpm_base = Kpm_ptr + off_b * kpm_batch_stride

    # -- the key range this block must visit --
    kv_lo = 0
    kv_hi = kv_len
    if HAS_KPM:  # from the first to one past the last attended key: the padding outside is skipped
        kv_lo = kv_len
        kv_hi = 0
        for scan_start in range(0, kv_len, SCAN_BLOCK):
            offs_scan = scan_start + tl.arange(0, SCAN_BLOCK)
            attend = tl.load(kpm_base + offs_scan * kpm_stride, mask=offs_scan < kv_len, other=0) != 0
            kv_lo = tl.minimum(kv_lo, tl.min(tl.where(attend, offs_scan, kv_len), 0))
            kv_hi = tl.maximum(kv_hi, tl.max(tl.where(attend, offs_scan + 1, 0), 0))
    causal_offset = kv_len - q_len
    unmasked_hi = kv_hi
    if CAUSAL:
        # keys below the block's first row's diagonal are visible to every row of the block
        unmasked_hi = tl.minimum(kv_hi, tl.maximum(start_m * BLOCK_M + causal_offset + 1, 0))
        kv_hi = tl.minimum(kv_hi, (start_m + 1) * BLOCK_M + causal_offset)
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    mid = tl.maximum(lo, (unmasked_hi // BLOCK_N) * BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # -- full blocks (no edge masks), then the blocks on the kv end or the causal diagonal --
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base,
        k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride, bias_q_stride, bias_kv_stride, kpm_stride,
        offs_m, offs_d, lo, mid, q_len, kv_len, causal_offset, scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_BIAS, HAS_KPM, False, INPUT_PRECISION,
    )
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base,
        k_seq_stride, k_dim_stride, v_seq_stride, v_dim_stride, bias_q_stride, bias_kv_stride, kpm_stride,
        offs_m, offs_d, mid, kv_hi, q_len, kv_len, causal_offset, scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_BIAS, HAS_KPM, True, INPUT_PRECISION,
    )

    # -- normalize; rows that saw no key keep acc == 0 and give zeros --
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_base = Out_ptr + off_b * out_batch_stride + off_h * out_head_stride
    out_ptrs = out_base + offs_m[:, None] * out_seq_stride + offs_d[None, :]
    tl.store(out_ptrs, cast(out, Out_ptr.dtype.element_ty), mask=q_mask)


# Block sizes by padded head_dim, chosen from `tritonize bench-kernels --sweep` on an H100 at 512 and
# 4096 tokens (benchmarks/results/kernel-sweep-*.json); fp32 tiles are halved to fit shared memory.
_CONFIGS_16BIT = {64: AttentionConfig(128, 64, 8, 4), 128: AttentionConfig(128, 64, 8, 3),
                  256: AttentionConfig(64, 64, 4, 3)}
_SHORT_QUERY_CONFIG = AttentionConfig(64, 64, 4, 3)  # up to SHORT_QUERY_LEN rows: more, lighter programs
SHORT_QUERY_LEN = 1024
# mask bytes read per step while a program looks for its attended key range; one fixed value, so no
# sequence length ever compiles a new variant of the kernel
KEY_SCAN_BLOCK = 256
_CONFIGS_FP32 = {64: AttentionConfig(128, 64, 8, 2), 128: AttentionConfig(64, 32, 8, 2),
                 256: AttentionConfig(32, 32, 4, 1)}


def default_config(head_dim: int, q_len: int, dtype: torch.dtype) -> AttentionConfig:
    """Block sizes by head_dim, dtype and query length; large blocks under the interpreter."""
    if INTERPRETED:
        return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return _CONFIGS_FP32[max(64, triton.next_power_of_2(head_dim))]
    if q_len <= SHORT_QUERY_LEN:
        return _SHORT_QUERY_CONFIG
    return _CONFIGS_16BIT[max(64, triton.next_power_of_2(head_dim))]


def flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """Launches the kernel; arguments as in `tritonize.ops.attention` (validated there). pdl: launch as a
    programmatic dependent launch (default: where the GPU has it, sm_90+)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if kv_len == 0:
        return out.zero_()
    config = config or default_config(head_dim, q_len, q.dtype)

    has_bias, has_kpm = bias is not None, key_padding_mask is not None
    if has_bias:
        bias = bias.expand(batch, heads, q_len, kv_len)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    if has_kpm:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        kpm_strides = kpm.stride()
    else:  # the kernel never reads this pointer; any tensor stands in
        kpm = q
        kpm_strides = (0, 0)
    if bias is None:
        bias = q

    pdl = pdl_supported(q.device) if pdl is None else pdl
    grid = (triton.cdiv(q_len, config.block_m), batch * heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, bias, kpm,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        *bias_strides, *kpm_strides,
        heads, heads // kv_heads, q_len, kv_len, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, HAS_BIAS=has_bias, HAS_KPM=has_kpm,
        SCAN_BLOCK=KEY_SCAN_BLOCK, INPUT_PRECISION=dot_precision(q.dtype), PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return out

"""Tutorial 4: flash attention, from a materialized softmax to tritonize's kernel.

Attention is softmax(q @ k^T * scale) @ v. Written naively it materializes a [q_len, kv_len] score
matrix per head, which costs memory traffic quadratic in the sequence length. FlashAttention never
writes that matrix: one Triton program owns a block of query rows, streams the keys and values in
blocks, and keeps a running ("online") softmax, so only the output reaches memory.

We build it in four steps: (a) naive PyTorch, (b) a kernel that loads all keys at once, (c) the
streaming kernel with an online softmax (FlashAttention-2), (d) tritonize.ops.attention itself.

Run: `TRITON_INTERPRET=1 python tutorials/04_flash_attention.py` (no GPU needed: without CUDA the
kernels run through Triton's interpreter, which this script switches on before importing triton).
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import triton`

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tritonize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, HEADS, SEQ, HEAD_DIM = 1, 2, 40, 32
SCALE = 1.0 / math.sqrt(HEAD_DIM)
torch.manual_seed(0)
q, k, v = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, device=DEVICE) for _ in range(3))


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Relative error ||out - ref|| / ||ref|| against a float64 reference."""
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"{name:<40} relative error {err:.1e}")
    assert err < tol, f"{name}: relative error {err:.1e} >= {tol}"


# -- (a) naive attention: the whole score matrix lives in memory ------------------------------------
def naive_attention(q, k, v, scale, allowed=None):
    scores = q @ k.transpose(-2, -1) * scale  # [batch, heads, q_len, kv_len], materialized
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v  # fully masked rows -> zeros


ref = naive_attention(q.double(), k.double(), v.double(), SCALE)
check("(a) naive torch, float32", naive_attention(q, k, v, SCALE), ref)


# -- (b) one query block per program, all keys loaded at once -----------------------------------------
# Fine while every key fits in one tile (BLOCK_N >= seq_len): a plain softmax over the row works.
@triton.jit
def attention_all_keys_kernel(Q, K, V, Out, seq_len, scale,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    base = tl.program_id(1) * seq_len * HEAD_DIM  # one (batch, head) of contiguous [B*H, S, D]
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok, n_ok = offs_m < seq_len, offs_n < seq_len
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(n_ok[None, :], s, float("-inf"))  # padding columns of the tile take no weight
    p = tl.exp(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    out = tl.dot(p, v, input_precision="ieee")
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out, mask=m_ok[:, None])


def launch(kernel, q, k, v, block_m=16, **blocks):
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    grid = (triton.cdiv(SEQ, block_m), BATCH * HEADS)
    kernel[grid](q, k, v, out, SEQ, SCALE, HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, **blocks)
    return out


check("(b) Triton, all keys in one tile", launch(attention_all_keys_kernel, q, k, v,
                                                 BLOCK_N=triton.next_power_of_2(SEQ)), ref)


# -- (c) streaming over key blocks with an online softmax (FlashAttention-2) --------------------------
# Keep per row the running maximum m_i and sum l_i. When a block raises the maximum, everything
# accumulated so far is rescaled by alpha = exp(m_old - m_new); dividing by l_i happens once, at the end.
@triton.jit
def flash_attention_kernel(Q, K, V, Out, seq_len, scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    base = tl.program_id(1) * seq_len * HEAD_DIM
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seq_len
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)  # 0 on the first block, where m_i = -inf
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=m_ok[:, None])


# 16-key blocks: 40 keys take three steps, the last one partly masked
check("(c) Triton, streaming online softmax", launch(flash_attention_kernel, q, k, v, BLOCK_N=16), ref)


# -- (d) tritonize's kernel: causal + key-padding mask -----------------------------------------------
# src/tritonize/kernels/attention.py is (c) plus what real models need:
#  * GQA/MQA: k and v may have fewer heads (kv_heads dividing heads); head h reads kv head h // group.
#  * causal aligned to the end: query i sees keys j <= i + kv_len - q_len (decode with a KV cache).
#  * key_padding_mask: per batch row it finds the first and last attended key and never visits the
#    key blocks outside that range, so padded tails cost nothing.
#  * two loops: blocks fully below the causal diagonal and inside the kv length run without any
#    mask arithmetic; only the few blocks on the diagonal or the kv end pay for masks.
#  * exp2 instead of exp, with scale * log2(e) folded into one multiply-subtract per score.
#  * an additive bias (T5, ALiBi), any strides, fp16/bf16/fp32, head_dim 16..256.
tol = 1e-4 if DEVICE == "cpu" else 2e-3  # on a GPU fp32 dots may use TF32
key_padding_mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=DEVICE)
key_padding_mask[:, 33:] = False  # the last 7 keys are padding
out = tritonize.ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=DEVICE).tril()
allowed = causal & key_padding_mask[:, None, None, :]
check("(d) tritonize.ops.attention causal+pad", out,
      naive_attention(q.double(), k.double(), v.double(), SCALE, allowed), tol)

# GQA: two query heads share one kv head; the reference repeats it.
k1, v1 = k[:, :1], v[:, :1]
out = tritonize.ops.attention(q, k1, v1, causal=True)
check("(d) tritonize.ops.attention GQA causal", out,
      naive_attention(q.double(), k1.double().expand_as(q), v1.double().expand_as(q), SCALE, causal), tol)

# -- On a real GPU ------------------------------------------------------------------------------------
# Measured by this project on an NVIDIA H100 80GB HBM3 on 2026-11-25 (docs/benchmarks.md), fp16,
# CUDA-graph replay, against torch SDPA's backends in the same run:
#  * head_dim 128, from 4096 tokens: 469-521 TFLOP/s non-causal and 435-472 causal, 0.73-0.93x
#    cuDNN's, and faster than SDPA's flash and memory-efficient backends in every measured case.
#  * with a key-padding mask, from 1024 tokens: 1.02-1.68x cuDNN (686 vs 407 TFLOP/s at head_dim
#    128, 16384 tokens), the blocks of padded keys being skipped.
print("all attention checks passed")

"""Tutorial 01: a tiled matrix multiply, C = A @ B.

The idea
--------
A naive matmul reads each element of A once per column of C and each element of B once per row of C:
2*M*N*K loads from memory for 2*M*N*K flops. A GPU can do far more flops per second than it can load
bytes from DRAM, so that kernel starves. Tiling fixes it: each Triton program owns one BLOCK_M x BLOCK_N
tile of C, walks K in steps of BLOCK_K, and loads a BLOCK_M x BLOCK_K slab of A and a BLOCK_K x BLOCK_N
slab of B per step. Every loaded A element is reused BLOCK_N times and every B element BLOCK_M times,
from shared memory / registers instead of DRAM.

What the block sizes trade
--------------------------
- Bigger BLOCK_M/BLOCK_N: more reuse per byte loaded, but more registers and shared memory per program
  (fewer programs resident per SM) and fewer programs overall (small matrices may not fill the GPU).
- BLOCK_K: how much of K is staged at once; larger means fewer loop trips but more shared memory per
  pipeline stage.
- Ragged edges (M, N, K not multiples of the blocks) are handled with masks: out-of-range loads read 0
  (harmless in a dot product) and out-of-range stores are skipped.

Run: `TRITON_INTERPRET=1 python tutorials/01_tiled_matmul.py` (set automatically when there is no GPU).
"""

import os

import torch

if not torch.cuda.is_available():
    # The interpreter must be chosen before @triton.jit runs: kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- 1. The kernel: one program computes one BLOCK_M x BLOCK_N tile of C --------------------------------
@triton.jit
def matmul_kernel(
    A, B, C, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of C (and A) this program owns
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of C (and B)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # BLOCK_M x BLOCK_K pointers
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # BLOCK_K x BLOCK_N pointers

    # Accumulate in fp32 whatever the input dtype: fp16 sums over thousands of K terms lose digits.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        # Masks: rows past M, columns past N and the K tail read as 0, which adds nothing to the dot.
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (k + offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(k + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)  # on a GPU: tensor cores, operands from shared memory / registers
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- 2. The host launcher: one program per output tile ---------------------------------------------------
def matmul(a: torch.Tensor, b: torch.Tensor, block_m=32, block_n=32, block_k=32) -> torch.Tensor:
    (M, K), (K2, N) = a.shape, b.shape
    assert K == K2, "inner dimensions differ"
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    matmul_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return c


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# -- 3. Check against PyTorch, including sizes that are not multiples of the blocks ---------------------
def main() -> None:
    torch.manual_seed(0)
    # tl.dot wants every block dimension >= 16; 100x70x50 leaves ragged tiles on all three axes.
    for (M, N, K), blocks in [((100, 70, 50), (32, 32, 32)), ((64, 64, 64), (64, 64, 32)), ((17, 33, 9), (16, 16, 16))]:
        a = torch.randn(M, K, device=DEVICE, dtype=torch.float32)
        b = torch.randn(K, N, device=DEVICE, dtype=torch.float32)
        c = matmul(a, b, *blocks)
        err = rel_error(c, a.double() @ b.double())
        print(f"M={M:4d} N={N:4d} K={K:4d} blocks={blocks}: relative error vs float64 torch = {err:.2e}")
        # fp32 inputs; on a GPU tl.dot may use TF32 (10-bit mantissa), hence the loose bound.
        assert err < 5e-3, err
    print("tiled matmul matches torch")


# -- 4. On a real GPU -----------------------------------------------------------------------------------
# On an H100 the same kernel runs compiled (no TRITON_INTERPRET), with fp16/bf16 inputs and tiles such as
# 128x128x64 feeding the tensor cores, several K steps in flight (num_stages) to hide load latency.
# Figures this project measured on an H100 80GB HBM3 (2026-11-25, benchmarks/results/, docs/benchmarks.md):
# - the cuBLAS fp16 8192^3 matmul ceiling was ~686-752 TFLOP/s across leases;
# - tritonize's linear kernel (src/tritonize/kernels/linear.py), this tiling plus a fused epilogue, reached
#   582 TFLOP/s at M16384 N768 K3072 and 656 TFLOP/s at M1024 N2048 K8192;
# - at decode sizes (M of 1-16) timing with eager do_bench measured Python launch overhead, not the GPU:
#   time small kernels replayed from CUDA graphs.
if __name__ == "__main__":
    main()

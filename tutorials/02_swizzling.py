"""Tutorial 02: swizzling, or grouped program-id ordering for L2 reuse.

The idea
--------
Tutorial 01 launched a 2-D grid of output tiles. The GPU schedules programs roughly in program-id order,
so the programs running at the same moment (a "wave") are consecutive ids. With row-major ordering, a
wave covers one or two rows of tiles: it shares a few A row-blocks but needs *every* B column-block.
Those B blocks are fetched from DRAM and most are evicted from L2 before the next row of tiles wants them.

Grouped ordering (GROUP_M) walks the tiles in bands of GROUP_M row-blocks: ids go down a column of the
band first, then to the next column. A wave then covers a near-square patch of C, so it touches fewer
distinct A and B blocks, and each block it loads is reused by several programs while still in L2.
The arithmetic is unchanged; only which program computes which tile moves. tritonize does exactly this in
`_tile_coords` (src/tritonize/kernels/linear.py); the kernel below uses the same formula.

Run: `TRITON_INTERPRET=1 python tutorials/02_swizzling.py` (set automatically when there is no GPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before @triton.jit: run kernels on CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- 1. The ordering, in plain Python: program id -> (row block, column block) -------------------------
def tile_coords(pid: int, num_pid_m: int, num_pid_n: int, group_m: int) -> tuple[int, int]:
    """Same arithmetic as `_tile_coords` in tritonize's linear kernel; group_m=1 is row-major order."""
    group_first_m = (pid // (group_m * num_pid_n)) * group_m
    group_size_m = min(num_pid_m - group_first_m, group_m)  # the last band may be shorter
    pid_m = group_first_m + (pid % (group_m * num_pid_n)) % group_size_m
    pid_n = (pid % (group_m * num_pid_n)) // group_size_m
    return pid_m, pid_n


def blocks_touched(num_pid_m: int, num_pid_n: int, group_m: int, wave: int) -> tuple[int, int]:
    """Distinct A row-blocks and B column-blocks loaded by the first `wave` programs."""
    coords = [tile_coords(p, num_pid_m, num_pid_n, group_m) for p in range(wave)]
    return len({m for m, _ in coords}), len({n for _, n in coords})


# -- 2. The kernel: a 1-D grid, each program maps its id to a tile with the grouped order ----------------
@triton.jit
def grouped_matmul_kernel(
    A, B, C, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_size_m = min(num_pid_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (pid % (GROUP_M * num_pid_n)) % group_size_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size_m

    # From here on it is tutorial 01's tiled matmul.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (k + offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(k + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, block=32, block_k=32, group_m=4) -> torch.Tensor:
    (M, K), (_, N) = a.shape, b.shape
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, block) * triton.cdiv(N, block),)  # one program per tile, order chosen inside
    grouped_matmul_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k, GROUP_M=group_m,
    )  # fmt: skip
    return c


def main() -> None:
    # -- 3. Count what one wave of programs loads ----------------------------------------------------
    # A 16 x 16 grid of tiles (e.g. 2048 x 2048 with 128 x 128 tiles); 32 programs in flight at once.
    num_pid_m = num_pid_n = 16
    wave = 32
    print(f"grid {num_pid_m}x{num_pid_n} tiles, first {wave} programs:")
    for group_m in (1, 4, 8):
        rows, cols = blocks_touched(num_pid_m, num_pid_n, group_m, wave)
        label = "row-major" if group_m == 1 else f"GROUP_M={group_m}"
        print(f"  {label:10s}: {rows:2d} A row-blocks + {cols:2d} B column-blocks = {rows + cols:2d} blocks loaded")
    row_major = sum(blocks_touched(num_pid_m, num_pid_n, 1, wave))
    grouped = sum(blocks_touched(num_pid_m, num_pid_n, 8, wave))
    assert grouped < row_major  # 12 vs 18: a third fewer distinct blocks to fetch for the same work

    # -- 4. The kernel still computes the same product (ragged sizes, a short last band) ---------------
    torch.manual_seed(0)
    for M, N, K in [(100, 70, 50), (130, 96, 40)]:
        a = torch.randn(M, K, device=DEVICE)
        b = torch.randn(K, N, device=DEVICE)
        c = grouped_matmul(a, b, group_m=3)
        ref = a.double() @ b.double()
        err = ((c.double() - ref).norm() / ref.norm()).item()
        print(f"M={M} N={N} K={K} GROUP_M=3: relative error vs float64 torch = {err:.2e}")
        assert err < 5e-3, err
    print("grouped matmul matches torch")


# -- 5. On a real GPU -----------------------------------------------------------------------------------
# The interpreter runs programs one after another, so on CPU only the count above shows the effect. On an
# H100 (80GB HBM3, measured by this project 2026-11-25, benchmarks/results/ and docs/benchmarks.md):
# - in tritonize's linear-kernel sweep the persistent TMA tile 128x128x64 with grouped ordering was the
#   best configuration; a persistent kernel launches one program per SM and loops over tile ids through
#   the same `_tile_coords`, so the grouped order is also the order each wave walks;
# - that kernel reached 582 TFLOP/s at M16384 N768 K3072 and 656 TFLOP/s at M1024 N2048 K8192, against a
#   cuBLAS fp16 8192^3 ceiling of ~686-752 TFLOP/s.
if __name__ == "__main__":
    main()

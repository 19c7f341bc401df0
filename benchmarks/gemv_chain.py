"""How fast can a decode step's weight stream go when its GEMVs do not end at kernel boundaries?

An experiment: the upper bound of what kernels/gemv_chain.py does inside the decode step (there one
persistent launch a layer, between the attention kernels; `benchmarks/ab_decode_chain.py` times that).
The decode step of the 1.7 GB Llama at batch 1 streams its weights
through 65 GEMV launches (4 a layer and the lm_head) at about 2.1 TB/s, where a large copy reaches about
3 TB/s; docs/generation.md finds most of the gap in each launch's ramp-up and tail. Here the same chain of
plain GEMVs (y_i = W_i x_i, x_i the first K_i values of y_(i-1)) runs

- `launches`: one `tritonize.kernels.gemv.gemv_fwd` launch per matrix (PDL on, as the decode step), and
- `persistent`: one cooperative launch of G = SMs x P programs for the whole chain, phases separated by a
  grid barrier (an atomic counter), each program loading its first two weight tiles of the next phase
  before it waits at the barrier, so every SM keeps HBM reads in flight across phase boundaries;
- `persistent-per-layer`: the same kernel launched once a layer (4 phases), as it would sit between the
  attention kernels of a real decode step.

First, the cost of one grid barrier alone (a kernel of nothing but 65 barriers against one of 1) among 1, 3
and 6 programs per SM: what each phase join of a persistent decode kernel pays at least.

Each is captured in a CUDA graph and its replay timed (`triton.testing.do_bench`, medians of interleaved
rounds); outputs are compared with the launches'. Weight bytes / time = the stream's bandwidth, against a
device-to-device copy of 1 GB measured in the same process.

Usage (GPU): PYTHONPATH=src python benchmarks/gemv_chain.py [--layers 16] [--out DIR]
CPU check of the kernel through the interpreter (one program, so the barrier never waits):
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gemv_chain.py --check-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from tritonize.kernels import gemv
from tritonize.kernels.common import wait_previous_allow_next
from tritonize.kernels.gemv_chain import _grid_arrive, _grid_wait

# one layer of the 1.7 GB Llama-style config (hidden 2048, 32 heads / 8 kv heads of 64, intermediate 5632)
# as (name, N, K): the qkv, output, gate+up (as one plain [2 x 5632, 2048] matrix) and down projections
LAYER = (("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 11264, 2048), ("down", 2048, 5632))
LM_HEAD = ("lm_head", 32000, 2048)
TABLE_COLUMNS = 5  # weight pointer, x pointer, y pointer, N, K


@triton.jit
def _weight_tile(w_ptr, n, k, offs_k, N, K, valid):
    """Rows n (wrapped into [0, N)) and columns k .. k + BLOCK_K of a [N, K] weight, K contiguous; zero
    (and no traffic) past K or where not valid."""
    rows = w_ptr + (n % N).to(tl.int64)[:, None] * K
    cols = k + offs_k
    return tl.load(rows + cols[None, :], mask=((cols < K) & valid)[None, :], other=0.0)


@triton.jit
def _phase(table_ptr, p, DTYPE: tl.constexpr):
    """The p-th matrix of the chain: (weight, x, y pointers, N, K). Pointers 16-byte aligned and K a
    multiple of 16 (checked by the host), told to the compiler so that weight loads are 16-byte vectors."""
    row = table_ptr + p * 5
    w_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(DTYPE)), 16)
    x_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(DTYPE)), 16)
    y_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(DTYPE)), 16)
    return w_ptr, x_ptr, y_ptr, tl.load(row + 3).to(tl.int32), tl.multiple_of(tl.load(row + 4).to(tl.int32), 16)


@triton.jit
def _gemv_chain_kernel(
    table_ptr, counter_ptr, first_phase, last_phase,
    DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y_p = W_p x_p for p in [first_phase, last_phase), one row of x; program pid owns the BLOCK_N-row
    blocks pid, pid + G, ... of each matrix. The grid must be co-resident (a cooperative launch)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptr, x_ptr, y_ptr, N, K = _phase(table_ptr, first_phase, DTYPE)
    w0 = _weight_tile(w_ptr, pid * BLOCK_N + offs_n, 0, offs_k, N, K, pid * BLOCK_N < N)
    w1 = _weight_tile(w_ptr, pid * BLOCK_N + offs_n, BLOCK_K, offs_k, N, K, pid * BLOCK_N < N)
    wait_previous_allow_next(PDL)
    for p in range(first_phase, last_phase):
        w_ptr, x_ptr, y_ptr, N, K = _phase(table_ptr, p, DTYPE)
        for block in range(pid, tl.cdiv(N, BLOCK_N), programs):
            n = block * BLOCK_N + offs_n
            if block != pid:  # the first block's two tiles were loaded before the barrier
                w0 = _weight_tile(w_ptr, n, 0, offs_k, N, K, True)
                w1 = _weight_tile(w_ptr, n, BLOCK_K, offs_k, N, K, True)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                cols = k + offs_k
                x = tl.load(x_ptr + cols, mask=cols < K, other=0.0, cache_modifier=".cg").to(tl.float32)
                w2 = _weight_tile(w_ptr, n, k + 2 * BLOCK_K, offs_k, N, K, True)
                acc += tl.sum(w0.to(tl.float32) * x[None, :], axis=1)
                w0, w1 = w1, w2
            tl.store(y_ptr + n, acc.to(DTYPE), mask=n < N)
        if p + 1 < last_phase:
            _grid_arrive(counter_ptr)
            w_ptr, x_ptr, y_ptr, N, K = _phase(table_ptr, p + 1, DTYPE)
            w0 = _weight_tile(w_ptr, pid * BLOCK_N + offs_n, 0, offs_k, N, K, pid * BLOCK_N < N)
            w1 = _weight_tile(w_ptr, pid * BLOCK_N + offs_n, BLOCK_K, offs_k, N, K, pid * BLOCK_N < N)
            _grid_wait(counter_ptr, (p + 1 - first_phase) * programs)


@triton.jit
def _barriers_kernel(counter_ptr, rounds):
    """`rounds` grid barriers and nothing else, as the chain's (the counter 0 at launch): their cost alone."""
    programs = tl.num_programs(0)
    for r in range(rounds):
        _grid_arrive(counter_ptr)
        _grid_wait(counter_ptr, (r + 1) * programs)


def barrier_us(programs: int, device) -> float:
    """Microseconds per grid barrier among `programs` co-resident programs of 4 warps: a launch of 65 barriers
    minus a launch of 1, over 64 (both replayed in CUDA graphs, the counter zeroed in each)."""
    counter = torch.zeros(1, dtype=torch.int32, device=device)

    def run(rounds):
        counter.zero_()
        _barriers_kernel[(programs,)](counter, rounds, num_warps=4, launch_cooperative_grid=True)

    one, many = capture(lambda: run(1)), capture(lambda: run(65))
    return (do_bench_median(many.replay) - do_bench_median(one.replay)) * 1e3 / 64


TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class Chain:
    """The matrices of the chain, their outputs and the pointer table the persistent kernel reads."""

    def __init__(self, shapes, dtype, device, x):
        self.shapes = shapes
        self.weights = [torch.randn(N, K, dtype=dtype, device=device) / K**0.5 for _, N, K in shapes]
        self.outputs = [torch.full((1, N), float("nan"), dtype=dtype, device=device) for _, N, _ in shapes]
        self.x = x  # [1, K of the first matrix]
        inputs = [x] + self.outputs[:-1]
        rows = [[w.data_ptr(), i.data_ptr(), y.data_ptr(), N, K]
                for (_, N, K), w, i, y in zip(shapes, self.weights, inputs, self.outputs, strict=True)]
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.weight_bytes = sum(w.numel() * w.element_size() for w in self.weights)

    def inputs(self):
        return [self.x] + self.outputs[:-1]

    def run_launches(self):
        """One gemv_fwd per matrix."""
        for (_, _, K), w, i, y in zip(self.shapes, self.weights, self.inputs(), self.outputs, strict=True):
            gemv.gemv_fwd(i[:, :K], w, None, None, None, out=y)


def run_persistent(chain, counters, spans, programs, block_n, block_k, num_warps, pdl):
    """The chain as one cooperative launch per span [first, last) of phases; counters: one int32 per span."""
    counters.zero_()
    for index, (first, last) in enumerate(spans):
        _gemv_chain_kernel[(programs,)](
            chain.table, counters[index:], first, last,
            DTYPE=TL_DTYPES[chain.x.dtype], BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
            num_warps=num_warps, num_stages=1, launch_cooperative_grid=not gemv.INTERPRETED, launch_pdl=pdl,
        )  # fmt: skip


def resident_programs(block_n, block_k, num_warps, chain, counters) -> int:
    """Programs of the persistent kernel that fit on the GPU at once (registers, threads, shared memory)."""
    kernel = _gemv_chain_kernel.warmup(
        chain.table, counters, 0, 1, DTYPE=TL_DTYPES[chain.x.dtype], BLOCK_N=block_n, BLOCK_K=block_k,
        PDL=False, num_warps=num_warps, num_stages=1, grid=(1,),
    )  # fmt: skip
    kernel._init_handles()  # reads the register count off the loaded binary
    props = torch.cuda.get_device_properties(chain.x.device)
    registers_per_warp = -(-kernel.n_regs * 32 // 256) * 256
    by_registers = props.regs_per_multiprocessor // (registers_per_warp * num_warps)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    shared = kernel.metadata.shared
    by_shared = props.shared_memory_per_multiprocessor // shared if shared else 32
    per_sm = min(by_registers, by_threads, by_shared, 32)
    print(f"  persistent kernel block_n={block_n} block_k={block_k} warps={num_warps}: {kernel.n_regs} registers, "
          f"{shared} B shared -> {per_sm} programs per SM")
    return per_sm


def check_cpu() -> None:
    """The persistent kernel against torch through the interpreter: one program, odd sizes."""
    torch.manual_seed(0)
    shapes = (("a", 37, 29), ("b", 50, 37), ("c", 9, 50))
    x = torch.randn(1, 29, dtype=torch.float32)
    chain = Chain(shapes, torch.float32, torch.device("cpu"), x)
    counters = torch.zeros(2, dtype=torch.int32)
    run_persistent(chain, counters, [(0, 2), (2, 3)], 1, 8, 16, 4, False)
    reference = x.double()
    for w, y in zip(chain.weights, chain.outputs, strict=True):
        reference = reference[:, : w.shape[1]] @ w.double().T
        error = ((y.double() - reference).norm() / reference.norm()).item()
        assert error < 1e-6, error
    counter = torch.zeros(1, dtype=torch.int32)
    _barriers_kernel[(1,)](counter, 3)
    assert counter.item() == 3, counter
    print("interpreter check passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="4x1024x4,8x512x4,4x512x4,2x1024x4",
                        help="persistent configs BLOCK_NxBLOCK_KxWARPS, comma-separated")
    parser.add_argument("--check-cpu", action="store_true")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    torch.manual_seed(0)
    shapes = LAYER * args.layers + (LM_HEAD,)
    x = torch.randn(1, shapes[0][2], dtype=torch.bfloat16, device=device)
    chain = Chain(shapes, torch.bfloat16, device, x)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{card}: {len(shapes)} GEMVs, {chain.weight_bytes / 1e9:.3f} GB of bf16 weights, {sms} SMs")

    copy_tbs = copy_bandwidth(device)
    print(f"  copy of 1 GB: {copy_tbs:.2f} TB/s (read + write)")
    barriers = {}
    for per_sm in (1, 3, 6):
        try:
            barriers[sms * per_sm] = barrier_us(sms * per_sm, device)
            print(f"  grid barrier among {sms * per_sm} programs: {barriers[sms * per_sm]:.2f} us")
        except Exception as error:  # noqa: BLE001 - a grid that cannot launch is reported, not fatal
            print(f"  grid barrier among {sms * per_sm} programs: {type(error).__name__}: {error}")

    chain.run_launches()
    torch.cuda.synchronize()
    reference = [y.clone() for y in chain.outputs]
    graphs = {"launches": capture(chain.run_launches)}
    counters = torch.zeros(args.layers + 2, dtype=torch.int32, device=device)
    whole = [(0, len(shapes))]
    per_layer = [(4 * i, 4 * i + 4) for i in range(args.layers)] + [(4 * args.layers, len(shapes))]
    errors = {}
    for text in args.configs.split(","):
        block_n, block_k, warps = (int(v) for v in text.split("x"))
        per_sm = resident_programs(block_n, block_k, warps, chain, counters)
        for programs_per_sm in sorted({per_sm, max(1, per_sm // 2)}):
            for label, spans, pdl in (("persistent", whole, False), ("persistent-per-layer", per_layer, True)):
                name = f"{label} {text} P={programs_per_sm}"
                def run(spans=spans, pdl=pdl, g=sms * programs_per_sm, b=(block_n, block_k, warps)):
                    run_persistent(chain, counters, spans, g, *b, pdl)
                try:
                    for y in chain.outputs:
                        y.fill_(float("nan"))
                    run()
                    torch.cuda.synchronize()
                    errors[name] = max(((y.float() - r.float()).norm() / r.float().norm()).item()
                                       for y, r in zip(chain.outputs, reference, strict=True))
                    graphs[name] = capture(run)
                except Exception as error:  # noqa: BLE001 - a config that cannot launch is reported, not fatal
                    print(f"  {name}: {type(error).__name__}: {error}")
    times = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, graph in graphs.items():
            times[name].append(do_bench_median(graph.replay) * 1e3)
    results = {}
    print("| variant | us (median of rounds) | rounds | TB/s | of copy | vs launches | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name, rounds in times.items():
        us = statistics.median(rounds)
        tbs = chain.weight_bytes / us / 1e6
        results[name] = dict(us=rounds, us_median=us, tb_per_s=tbs, error=errors.get(name, 0.0))
        print(f"| {name} | {us:.1f} | {', '.join(f'{t:.1f}' for t in rounds)} | {tbs:.2f} | {tbs / copy_tbs:.2f} | "
              f"{statistics.median(times['launches']) / us:.3f}x | {errors.get(name, 0.0):.2g} |")
    out = Path(args.out) / f"gemv-chain-{card.lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                                   date=time.strftime("%Y-%m-%d %H:%M"), layers=args.layers,
                                   weight_bytes=chain.weight_bytes, copy_tb_per_s=copy_tbs, barrier_us=barriers,
                                   results=results),
                              indent=1))
    print(f"wrote {out}")


def copy_bandwidth(device) -> float:
    """TB/s (bytes read + written) of a 1 GB device-to-device copy."""
    source = torch.empty(1 << 29, dtype=torch.int16, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / do_bench_median(lambda: target.copy_(source)) / 1e9


def capture(run) -> torch.cuda.CUDAGraph:
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def do_bench_median(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


if __name__ == "__main__":
    main()

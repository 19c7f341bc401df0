"""In-graph latency of the decode step's sums: `torchrun --nproc-per-node N benchmarks/tp_allreduce.py`.

64 back-to-back sums of a [rows, 4096] bf16 tensor (an 8B Llama decode step has 64) captured in one CUDA
graph, through tritonize's RankCollectives: symmetric-memory one-shot ("auto") and NCCL's all_reduce
("torch.distributed"). Rank 0 prints the median over 20 replays of the time per sum.
"""

import torch
import torch.distributed as dist

from tritonize import parallel
from tritonize.generation.collectives import RankCollectives

SUMS, REPLAYS, HIDDEN = 64, 20, 4096


def graph_us_per_sum(collectives: RankCollectives, x: torch.Tensor) -> float:
    def body() -> torch.Tensor:
        y = x
        for _ in range(SUMS):
            y = collectives.sum(y)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(REPLAYS):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / SUMS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    rank, world = parallel.init_from_torchrun()
    device = torch.device("cuda", torch.cuda.current_device())
    for method in ("auto", "torch.distributed"):
        collectives = RankCollectives(None, device, torch.bfloat16, method)
        for rows in (1, 8):
            us = graph_us_per_sum(collectives, torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16))
            if rank == 0:
                print(f"world {world} {collectives.method:32s} rows {rows}: {us:.1f} us per sum "
                      f"(median of {REPLAYS} graph replays of {SUMS})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: GPU time per kernel of one `DecoderEngine.step` (torch.profiler), the
CUDA-graph replay time of a step, and a host profile (cProfile) of a one-token `tritonize.generate` call
(time to first token).

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/profile_generate.py [--config llama-1.7gb]
    [--batches 1 8] [--out DIR]
Prints one table per batch and writes profile-generate-<config>.json to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
from profile_model import kernel_times
from tp_generate import CONFIGS, random_llama
from triton.testing import do_bench

import tritonize
from tritonize.generation.api import _engine

PROMPT_LEN = 128


def host_profile(fn, lines: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(lines)
    return stream.getvalue()


def profile_batch(model, config: str, batch: int) -> dict:
    ids = torch.randint(2, model.config.vocab_size - 1, (batch, PROMPT_LEN), device="cuda")
    mask = torch.ones_like(ids)
    tritonize.generate(model, ids, mask, max_new_tokens=16, eos_token_id=[])  # compiles, caches
    torch.cuda.synchronize()
    start = time.perf_counter()
    tritonize.generate(model, ids, mask, max_new_tokens=1, eos_token_id=[])
    torch.cuda.synchronize()
    first_token_ms = (time.perf_counter() - start) * 1e3
    engine = _engine(model)
    engine.reserve(batch, PROMPT_LEN + 64)
    with torch.no_grad():
        real = mask.bool()  # the engine takes a bool mask (generate converts)
        prefill_ms = do_bench(lambda: engine.prefill(ids, real), warmup=5, rep=50, return_mode="median")
        host = host_profile(lambda: tritonize.generate(model, ids, mask, max_new_tokens=1, eos_token_id=[]))
        prefill_kernels = kernel_times(lambda: engine.prefill(ids, real), steps=5)
        engine.prefill(ids, real)
        tokens = ids[:, -1].clone()
        seqlens = engine.cache_seqlens.clone()

        def step():
            engine.cache_seqlens.copy_(seqlens)  # stay at one position: every call does the same work
            engine.step(tokens)

        kernels = kernel_times(step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replay_ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    gpu_us = sum(kernels.values())
    print(f"\n== {config} b{batch}: first token {first_token_ms:.2f} ms (prefill alone {prefill_ms:.3f} ms); "
          f"step graph replay {replay_ms:.3f} ms, kernels' GPU time {gpu_us:.1f} us, {len(kernels)} kernel names")
    for kernel, us in list(kernels.items())[:20]:
        print(f"  {us:8.1f} us  {kernel}")
    print(f"  prefill: {sum(prefill_kernels.values()):.1f} us of GPU time, top kernels:")
    for kernel, us in list(prefill_kernels.items())[:8]:
        print(f"  {us:8.1f} us  {kernel}")
    print(host[:6000])
    return dict(first_token_ms=first_token_ms, prefill_ms=prefill_ms, step_replay_ms=replay_ms,
                step_kernel_us=gpu_us, kernels=kernels, prefill_kernels=prefill_kernels, host_profile=host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1.7gb", choices=sorted(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    model = random_llama(args.config, torch.bfloat16, torch.device("cuda"))
    results = {f"b{batch}": profile_batch(model, args.config, batch) for batch in args.batches}
    out = Path(args.out) / f"profile-generate-{args.config}.json"
    out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(), results=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

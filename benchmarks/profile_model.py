"""Where an encoder's time goes: GPU time per kernel (torch.profiler) for tritonize and torch.compile, the
runner's host overhead (a full optimized call vs the bare CUDA-graph replay of its bucket), and the replay's
timeline: each kernel of the CUDA graph in launch order with its start (from the first kernel's) and
duration, medians over replays, and the idle time between kernels.

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/profile_model.py [--model bert-base]
    [--shapes 1x16 1x128 32x512] [--out DIR] [--no-pdl]
Prints one table per (shape, engine) and writes profile-<model>.json to --out.

Under programmatic dependent launch (sm_90 and newer) a kernel starts before the previous one ends and waits
for it inside, so the profiler's duration of each tritonize kernel includes that wait: the per-kernel table
then no longer says where the time goes. --no-pdl launches every kernel without PDL (the totals grow by the
launch gaps PDL hides, but each kernel's time is its own).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import tritonize
from tritonize.bench.models import build_model
from tritonize.kernels import common

STEPS = 20


def kernel_times(fn, steps: int = STEPS, device: torch.device | None = None) -> dict[str, float]:
    """Microseconds of GPU time per call, per kernel name, over `steps` calls (device None: CUDA; a CPU
    device: time per op)."""
    on_gpu = device is None or device.type == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    fn()
    synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == kind:
            totals[event.name[:90]] += (event.device_time if on_gpu else event.self_cpu_time_total) / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def replay_timeline(replay, replays: int = 10) -> list[dict]:
    """[{"kernel", "start_us", "duration_us", "gap_us"}, ...] for each kernel of one CUDA-graph replay in launch
    order: medians over `replays` replays of its start after the replay's first kernel started, its duration and
    the time from the previous kernel's end to its start (negative: they overlapped, as under PDL)."""
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_replay = len(kernels) // replays
    if per_replay == 0 or len(kernels) % replays:
        print(f"  no timeline: {len(kernels)} kernels over {replays} replays (the profiler missed some)")
        return []
    runs = [kernels[i * per_replay:(i + 1) * per_replay] for i in range(replays)]
    timeline = []
    for position in range(per_replay):
        starts = [run[position].time_range.start - run[0].time_range.start for run in runs]
        durations = [run[position].time_range.elapsed_us() for run in runs]
        gaps = [run[position].time_range.start - run[position - 1].time_range.end if position else 0.0
                for run in runs]
        timeline.append({"kernel": runs[0][position].name[:60], "start_us": statistics.median(starts),
                         "duration_us": statistics.median(durations), "gap_us": statistics.median(gaps)})
    return timeline


def print_timeline(timeline: list[dict], first: int = 16) -> None:
    if not timeline:
        return
    end = timeline[-1]["start_us"] + timeline[-1]["duration_us"]
    busy = sum(k["duration_us"] for k in timeline)
    idle = sum(max(0.0, k["gap_us"]) for k in timeline)
    print(f"  {len(timeline)} kernels, first start to last end {end:.1f} us, sum of durations {busy:.1f} us, "
          f"idle between kernels {idle:.1f} us; the first {first}:")
    for k in timeline[:first]:
        print(f"  {k['start_us']:8.1f} us  +{k['duration_us']:6.1f} us  gap {k['gap_us']:6.1f} us  {k['kernel']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--shapes", nargs="+", default=["1x16", "1x128", "8x512", "32x512"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-pdl", action="store_true", help="launch tritonize's kernels without PDL, so each "
                        "kernel's time excludes its wait for the previous one")
    args = parser.parse_args()
    common.PDL_ENABLED = not args.no_pdl
    model, make_inputs = build_model(args.model, "sdpa")
    model = model.to("cuda", torch.float16)
    engines = {
        "compile-default": torch.compile(copy.deepcopy(model)),
        "tritonize-no-graphs": tritonize.optimize_model(copy.deepcopy(model), cuda_graphs=False),
        "tritonize": tritonize.optimize_model(copy.deepcopy(model)),
    }
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for shape in args.shapes:
            batch, seq = (int(part) for part in shape.split("x"))
            inputs = {k: v.cuda() for k, v in make_inputs(batch, seq).items()}
            for name in ("compile-default", "tritonize-no-graphs"):
                times = kernel_times(lambda name=name, inputs=inputs: engines[name](**inputs))
                total = sum(times.values())
                results[f"{shape} {name}"] = {"gpu_us": total, "kernels": times}
                print(f"\n== {shape} {name}: {total:.1f} us of GPU time per call, {len(times)} kernel names")
                for kernel, us in list(times.items())[:14]:
                    print(f"  {us:8.1f} us  {kernel}")
            optimized = engines["tritonize"]
            optimized(**inputs)
            runner = optimized._tritonize_runner
            bucket = next(entry for key, entry in runner._entries.items() if key[0] == runner.buckets.fit(batch, seq))
            call_ms = do_bench(lambda optimized=optimized, inputs=inputs: optimized(**inputs),
                               warmup=25, rep=200, return_mode="median")
            replay_ms = do_bench(bucket.graph.replay, warmup=25, rep=200, return_mode="median")
            timeline = replay_timeline(bucket.graph.replay)
            results[f"{shape} tritonize"] = {"call_ms": call_ms, "replay_ms": replay_ms, "replay_timeline": timeline}
            print(f"\n== {shape} tritonize: full call {call_ms:.3f} ms, bare graph replay {replay_ms:.3f} ms")
            print_timeline(timeline)
    print(tritonize.report(engines["tritonize"]))
    out = Path(args.out) / f"profile-{args.model}{'-no-pdl' if args.no_pdl else ''}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where the first call of each new shape bucket goes: an optimized encoder (fp16 on a CUDA GPU) through the
benchmark's shapes in its order, in one process, with each bucket's first call split into its phases.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/bucket_warmup_profile.py --out DIR \\
        [--model bert-base] [--shapes 1x16,1x128,...] [--profile 32x512]

A fresh TRITON_CACHE_DIR makes Triton's cache cold, as on a new machine (the script reports how many files the
cache held at the start). Per bucket: the whole first call (synchronized), the discovery run and parallel
compile with the number of kernels compiled, each call of the compiled forward during the capture (the
discovery run, the warm-up runs, the captured run; host time: the GPU runs asynchronously), and the capture
in all. --profile BxS writes cProfile statistics of that bucket's first call (DIR/bucket-BxS.prof, the top 30
functions by cumulative time in DIR/bucket-BxS-profile.txt). Writes DIR/bucket-warmup-<model>.json.
Without a GPU it runs on CPU (kernels through the interpreter with TRITON_INTERPRET=1; no graphs, so no
phases): a check of the script only.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
import triton

import tritonize
from tritonize.bench.models import SHAPES, build_model


def _timed(record: list, label: str, function):
    """`function` with each call's seconds appended to `record` as (label, seconds[, result])."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        record.append((label, time.perf_counter() - start, result if isinstance(result, int) else None))
        return result
    return wrapper


def _summary(record: list) -> dict:
    """The phases of one bucket's capture by name, where the record has the runner's usual sequence: the
    compiled forward's discovery run (inside the parallel compile), the parallel compile, the warm-up runs,
    the captured run, then the capture in all (each entry is appended when its call returns)."""
    labels = [label for label, _, _ in record]
    if labels[:2] != ["compiled forward", "discovery + parallel compile"] or labels[-1] != "capture in all":
        return {}
    seconds = [s for _, s, _ in record]
    return {"discovery_run_s": seconds[0], "parallel_compile_s": seconds[1] - seconds[0],
            "kernels_compiled": record[1][2], "warmup_runs_s": seconds[2:-2], "captured_run_s": seconds[-2],
            "capture_rest_s": seconds[-1] - sum(seconds[1:-1])}


def _cache_files() -> int:
    cache_dir = Path(triton.knobs.cache.dir)
    return sum(1 for path in cache_dir.rglob("*") if path.is_file()) if cache_dir.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES),
                        help="BxS,... in the order to run them (default: the benchmark's)")
    parser.add_argument("--profile", default=None, metavar="BxS", help="cProfile this bucket's first call")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_files_at_start = _cache_files()
    model, make_inputs = build_model(args.model, "sdpa")
    model = model.to(device, torch.float16 if device == "cuda" else torch.float32)
    start = time.perf_counter()
    tritonize.optimize_model(model)
    optimize_s = time.perf_counter() - start
    runner = model._tritonize_runner
    record: list = []
    runner.compiled = _timed(record, "compiled forward", runner.compiled)
    runner._compile_kernels_in_parallel = _timed(record, "discovery + parallel compile",
                                                 runner._compile_kernels_in_parallel)
    runner._capture = _timed(record, "capture in all", runner._capture)
    args.out.mkdir(parents=True, exist_ok=True)
    buckets = []
    for batch, seq in shapes:
        inputs = {k: v.to(device) for k, v in make_inputs(batch, seq).items()}
        profiled = args.profile == f"{batch}x{seq}"
        profiler = cProfile.Profile()
        record.clear()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profiler if profiled else contextlib.nullcontext(), torch.inference_mode():
            model(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        bucket = {"shape": f"{batch}x{seq}", "first_call_s": first_call_s, **_summary(record),
                  "phases": [{"phase": label, "seconds": seconds, **({"kernels": count} if count is not None else {})}
                             for label, seconds, count in record]}
        buckets.append(bucket)
        print(json.dumps(bucket), flush=True)
        if profiled:
            profiler.dump_stats(args.out / f"bucket-{batch}x{seq}.prof")
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
            (args.out / f"bucket-{batch}x{seq}-profile.txt").write_text(text.getvalue())
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__,
              "triton_cache_files_at_start": cache_files_at_start, "optimize_model_s": optimize_s, "buckets": buckets}
    (args.out / f"bucket-warmup-{args.model}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

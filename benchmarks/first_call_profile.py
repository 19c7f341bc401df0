"""Where a new process's first call of an optimized encoder goes (CUDA GPU): optimize_model plus the first call
at 1 x 16, imports excluded, with TorchDynamo's compile time per frame (embeddings, one block, pooler).

    python benchmarks/first_call_profile.py --out DIR [--model bert-base] [--gc on|paused] [--profile]

Run it in fresh processes after a benchmark has filled Triton's cache (what a restarted server pays).
--gc on leaves Python's cyclic garbage collector running during warm-up (tritonize pauses it: the A/B).
--profile runs the process under cProfile and writes DIR/first-call-<model>.prof. Prints one JSON line and
writes it to DIR/first-call-<model>-gc-<gc>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import time
from pathlib import Path

import torch
import torch._dynamo.convert_frame as convert_frame

import tritonize
import tritonize.optimize
import tritonize.runtime.cuda_graphs
from tritonize.bench.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--gc", choices=("on", "paused"), default="paused")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("first_call_profile.py times the GPU path: it needs a CUDA GPU")
    if args.gc == "on":
        tritonize.optimize.cyclic_gc_paused = contextlib.nullcontext
        tritonize.runtime.cuda_graphs.cyclic_gc_paused = contextlib.nullcontext
    frames = []
    dynamo_compile = convert_frame._compile

    def timed_compile(code, *rest, **kwargs):
        start = time.perf_counter()
        try:
            return dynamo_compile(code, *rest, **kwargs)
        finally:
            frames.append((f"{Path(code.co_filename).name}:{code.co_name}", time.perf_counter() - start))

    convert_frame._compile = timed_compile
    model, make_inputs = build_model(args.model, "sdpa")
    model = model.to("cuda", torch.float16)
    inputs = {k: v.cuda() for k, v in make_inputs(1, 16).items()}
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with profiler if args.profile else contextlib.nullcontext():
        tritonize.optimize_model(model)
        optimize_s = time.perf_counter() - start
        with torch.inference_mode():
            model(**inputs)
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profiler.dump_stats(args.out / f"first-call-{args.model}.prof")
    result = {"model": args.model, "gc": args.gc, "profiled": args.profile, "card": torch.cuda.get_device_name(),
              "torch": torch.__version__, "optimize_model_s": optimize_s, "first_call_s": first_call_s,
              "dynamo_frames_s": frames}
    print(json.dumps(result))
    (args.out / f"first-call-{args.model}-gc-{args.gc}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

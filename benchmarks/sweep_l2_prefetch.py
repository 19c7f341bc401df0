"""How many weight bytes a decode step should pull into L2 during each layer's rotary + attention.

Runs tritonize.generate on the Llama-style 1.7 GB config (bf16, random weights, prompt 128, 256 new tokens,
batch 1 and 8) once per value of `generation.decoder.L2_PREFETCH_BYTES` (0 = off), rebuilding the engine each
time, and reports the decode step (difference of a 256- and a 32-token run, median of 3) and whether the tokens
equal those of the run without prefetch (they must: the prefetch is a hint).

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/sweep_l2_prefetch.py [--out DIR] [--mib 0 8 24]
Writes sweep-l2-prefetch-<card>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import tritonize
from tritonize.bench.generation import LLAMA_1_7GB, SHORT_RUN
from tritonize.generation import decoder
from tritonize.generation.api import ENGINE_ATTRIBUTE

NEW_TOKENS, PROMPT_LEN, REPEATS = 256, 128, 3


def seconds(model, ids, n: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = tritonize.generate(model, ids, torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--mib", type=int, nargs="+", default=[0, 8, 16, 24, 32, 40])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_1_7GB)).to("cuda", torch.bfloat16).eval()
    card = torch.cuda.get_device_name()
    rows, reference = [], {}
    for batch in (1, 8):
        ids = torch.randint(2, LLAMA_1_7GB["vocab_size"] - 1, (batch, PROMPT_LEN), device="cuda")
        for mib in args.mib:
            decoder.L2_PREFETCH_BYTES = mib << 20
            if hasattr(model, ENGINE_ATTRIBUTE):
                delattr(model, ENGINE_ATTRIBUTE)  # the plan is made with the engine
            seconds(model, ids, 8)  # warm-up: compiles, captures
            short = statistics.median(seconds(model, ids, SHORT_RUN)[0] for _ in range(REPEATS))
            runs = [seconds(model, ids, NEW_TOKENS) for _ in range(REPEATS)]
            total, tokens = statistics.median(s for s, _ in runs), runs[-1][1]
            step_ms = (total - short) / (NEW_TOKENS - SHORT_RUN) * 1e3
            same = bool(torch.equal(tokens, reference.setdefault(batch, tokens)))
            rows.append(dict(batch=batch, prefetch_mib=mib, step_ms=step_ms, tokens_per_s=batch / step_ms * 1e3,
                             tokens_equal_to_no_prefetch=same))
            print(f"batch {batch} prefetch {mib:3d} MiB: step {step_ms:.4f} ms  {batch / step_ms * 1e3:8.1f} tokens/s  "
                  f"tokens equal: {same}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep-l2-prefetch-{card.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(dict(card=card, date=datetime.datetime.now(datetime.UTC).isoformat(),
                                    torch=torch.__version__, config="llama-1.7gb", rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

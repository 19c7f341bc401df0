"""A/B: the flash attention kernel launched with programmatic dependent launch (PDL) or not, bert-base fp16
in tritonize's CUDA graphs, both in one process.

Two copies of the model (same weights) are optimized; the first captures its graphs with the attention
kernel's PDL switched off (`attention.pdl_supported` replaced), the second with it on, so each graph keeps
its launch mode. Then 3 interleaved rounds of `do_bench` medians per shape; outputs compared with the copy
without PDL. The script behind `benchmarks/results/ab-attention-pdl-bert-base-*.json` (run 2026-12-07
from .scratch with the same code, imports and formatting aside).

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/ab_attention_pdl.py [OUT_DIR]
"""

import json
import os
import statistics
import sys
import time

import torch
import triton
from triton.testing import do_bench

import tritonize
from tritonize.bench.models import build_model
from tritonize.kernels import attention

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128)]
VARIANTS = {"attention pdl off": lambda device: False, "attention pdl on": lambda device: True}

models = {}
for name in VARIANTS:
    model, make_inputs = build_model("bert-base", "sdpa")
    if models:
        model.load_state_dict(next(iter(models.values())).state_dict())
    models[name] = tritonize.optimize_model(model.to("cuda", torch.float16))
inputs = {s: {k: v.cuda() for k, v in make_inputs(*s).items()} for s in SHAPES}
times = {(v, s): [] for v in VARIANTS for s in SHAPES}
outs = {}
with torch.inference_mode():
    for name, flag in VARIANTS.items():  # graphs captured now keep this launch mode
        attention.pdl_supported = flag
        for s in SHAPES:
            outs[(name, s)] = models[name](**inputs[s])[0].float().clone()
    for _ in range(3):
        for name in VARIANTS:
            for s in SHAPES:
                fn = lambda name=name, s=s: models[name](**inputs[s])  # noqa: E731
                times[(name, s)].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
rows = {}
for s in SHAPES:
    for name in VARIANTS:
        med = statistics.median(times[(name, s)])
        err = (outs[(name, s)] - outs[("attention pdl off", s)]).abs().max().item()
        rows[f"{name} {s[0]}x{s[1]}"] = dict(ms=times[(name, s)], median_ms=med, max_abs_diff_vs_off=err)
        rounds = ", ".join(f"{t:.4f}" for t in times[(name, s)])
        print(f"{s[0]:3d}x{s[1]:<4d} {name:20s} {med:.4f} ms [{rounds}] diff {err:.3g}", flush=True)
card = torch.cuda.get_device_name()
path = os.path.join(OUT, f"ab-attention-pdl-bert-base-{card.lower().replace(' ', '-')}.json")
with open(path, "w") as file:
    json.dump(dict(card=card, date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton.__version__,
                   results=rows), file, indent=1)

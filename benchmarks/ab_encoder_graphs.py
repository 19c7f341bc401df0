"""A/B of kernel launch choices for an encoder (bert-base fp16) in tritonize's CUDA graphs, in one process.

Each variant optimizes its own copy of the model (same weights) and captures its graphs with its switches
set (module attributes the kernels read at launch, or optimize_model at optimization), so each graph keeps
its launch modes. Then 3
interleaved rounds of `do_bench` medians per shape, so drift hits every variant alike; outputs compared
with the first variant's.

Experiments:
- attention-pdl: the flash attention kernel launched with programmatic dependent launch (PDL) or not
  (behind `benchmarks/results/ab-attention-pdl-bert-base-*.json`, 2026-12-07);
- layer-norm: the LayerNorm kernels launched with PDL or not, and `linear_layer_norm` normalizing in the
  split-K reduce of its product (one launch) or in a norm kernel after it, all four combinations, and
  the shipped choice (PDL up to `norm.PDL_MAX_ROWS` rows; added after the 2026-12-07 run, which had the
  four others: `ab-layer-norm-bert-base-*.json`);
- embeddings: BERT's embeddings and pooler compiled by optimize_model (one embedding + LayerNorm kernel, the
  pooler's linear + tanh as one GEMV) or left as PyTorch ops inside the CUDA graph;
- weight-prefetch: the tiled linear kernel prefetching its weight slice into L2 before its PDL wait, or not,
  and the shipped gate (`linear.PREFETCH_WEIGHT_MAX_M`). The 2026-12-07 H100 run
  (`ab-prefetch-prologue-bert-base-*.json`) was this experiment crossed with a LayerNorm computed in the next
  product's prologue, since removed (commit b09b935 has that script and the prologue). A finish-in-launch
  experiment (the product's own launch doing the split-K reduce and the norm on few rows) ran on the H100 on
  2026-12-07 (`ab-finish-in-launch-removed-bert-base-*.json`) and was removed with that code (commit 76a7ddc).

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/ab_encoder_graphs.py EXPERIMENT [OUT_DIR]
Writes ab-EXPERIMENT-bert-base-<card>.json to OUT_DIR (default: .).
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
from tritonize import optimize
from tritonize.bench.models import build_model
from tritonize.kernels import attention, linear, norm

SHIPPED_COMPILE_OTHER_CHILDREN = optimize._compile_other_children


def switches(attention_pdl=True, norm_pdl_rows=norm.PDL_MAX_ROWS, norm_in_reduce=True,
             prefetch_weight_rows=linear.PREFETCH_WEIGHT_MAX_M, compile_other_children=True) -> dict:
    """(module, attribute) -> value for one variant; the defaults are what tritonize ships. norm_pdl_rows: the
    norm kernels launch with PDL on at most this many rows; prefetch_weight_rows: the tiled linear kernel
    prefetches its weight into L2 before its PDL wait on at most this many rows; compile_other_children:
    optimize_model compiles BERT's embeddings and pooler too (else they run as PyTorch ops)."""
    return {
        (attention, "pdl_supported"): lambda device: attention_pdl,
        (norm, "PDL_MAX_ROWS"): norm_pdl_rows,
        (linear, "MAX_FUSED_NORM_COLS"): linear.MAX_FUSED_NORM_COLS if norm_in_reduce else 0,
        (linear, "PREFETCH_WEIGHT_MAX_M"): prefetch_weight_rows,
        (optimize, "_compile_other_children"): (SHIPPED_COMPILE_OTHER_CHILDREN if compile_other_children
                                                else lambda target, backend: []),
    }


EXPERIMENTS = {
    "attention-pdl": {
        "attention pdl off": switches(attention_pdl=False),
        "attention pdl on": switches(),
    },
    "layer-norm": {
        "norm kernel, no pdl": switches(norm_pdl_rows=0, norm_in_reduce=False),
        "norm kernel, pdl": switches(norm_pdl_rows=1 << 40, norm_in_reduce=False),
        "norm in reduce, no pdl": switches(norm_pdl_rows=0),
        "norm in reduce, pdl": switches(norm_pdl_rows=1 << 40),
        "norm in reduce, pdl up to 512 rows": switches(),
    },
    "embeddings": {
        "embeddings and pooler as pytorch ops": switches(compile_other_children=False),
        "embeddings and pooler compiled": switches(),
    },
    "weight-prefetch": {
        "no weight prefetch": switches(prefetch_weight_rows=0),
        "weight prefetch": switches(prefetch_weight_rows=1 << 40),
        "weight prefetch up to 128 rows": switches(),
    },
}
SHAPES = {"attention-pdl": [(1, 16), (1, 128), (8, 128), (32, 128)],
          "layer-norm": [(1, 16), (1, 128), (1, 512), (8, 128), (32, 128)],
          "weight-prefetch": [(1, 16), (1, 128), (1, 512), (8, 128)],
          "embeddings": [(1, 16), (1, 128), (8, 128)]}


def main(experiment: str, out_dir: str) -> None:
    variants, shapes = EXPERIMENTS[experiment], SHAPES[experiment]
    models, weights, inputs, outs = {}, None, None, {}
    for name, settings in variants.items():  # optimized and captured under its switches, kept by its graphs
        for (module, attribute), value in settings.items():
            setattr(module, attribute, value)
        model, make_inputs = build_model("bert-base", "sdpa")
        if weights is None:
            weights = model.state_dict()
            inputs = {s: {k: v.cuda() for k, v in make_inputs(*s).items()} for s in shapes}
        model.load_state_dict(weights)
        models[name] = tritonize.optimize_model(model.to("cuda", torch.float16))
        with torch.inference_mode():
            for s in shapes:
                outs[(name, s)] = models[name](**inputs[s])[0].float().clone()
    times = {(v, s): [] for v in variants for s in shapes}
    with torch.inference_mode():
        for _ in range(3):
            for name in variants:
                for s in shapes:
                    fn = lambda name=name, s=s: models[name](**inputs[s])  # noqa: E731
                    times[(name, s)].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    first, rows = next(iter(variants)), {}
    for s in shapes:
        for name in variants:
            med = statistics.median(times[(name, s)])
            err = (outs[(name, s)] - outs[(first, s)]).abs().max().item()
            rows[f"{name} {s[0]}x{s[1]}"] = dict(ms=times[(name, s)], median_ms=med, max_abs_diff_vs_first=err)
            rounds = ", ".join(f"{t:.4f}" for t in times[(name, s)])
            print(f"{s[0]:3d}x{s[1]:<4d} {name:24s} {med:.4f} ms [{rounds}] diff {err:.3g}", flush=True)
    card = torch.cuda.get_device_name()
    path = os.path.join(out_dir, f"ab-{experiment}-bert-base-{card.lower().replace(' ', '-')}.json")
    with open(path, "w") as file:
        json.dump(dict(card=card, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                       triton=triton.__version__, experiment=experiment, results=rows), file, indent=1)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in EXPERIMENTS:
        sys.exit(f"usage: ab_encoder_graphs.py {{{'|'.join(EXPERIMENTS)}}} [OUT_DIR]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ".")

"""A/B of decode GEMV variants inside the decode step of a Llama-style model, in one process on one GPU.

For each variant, one `DecoderEngine.step` (batch 1 or 2: every projection a GEMV) is captured in a CUDA
graph and its replay timed (`triton.testing.do_bench`, median) in interleaved rounds, so drift hits every
variant alike; its logits are compared with the first variant's. Then `tritonize.generate`'s decode rate
(new tokens per second between 32 and 256 new tokens) for the first variant and the fastest others.

A variant is NAME=SETTINGS:
- SETTINGS a comma-separated list of PROJECTION.FIELD=VALUE over `gemv.pick_config`'s choice, PROJECTION
  one of qkv, o, gate_up, down, lm_head or * (all), FIELD a `gemv.GemvConfig` field; empty: the shipped
  configs. E.g. 'narrow=*.block_k=512,gate_up.block_n=2'.
- or @FILE: `gemv_fwd` and `pick_config` of another copy of kernels/gemv.py, e.g. the last commit's
  (`git show HEAD~1:src/tritonize/kernels/gemv.py > .scratch/gemv_before.py`).

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/ab_decode_gemv.py [--config llama-1.7gb]
    [--batch 1] --variant shipped= --variant 'bk512=gate_up.block_k=512' ... [--rounds 3]
    [--generate 2] [--out DIR]
Prints a table and writes ab-decode-gemv-<config>-b<batch>-<card>.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from gemv_occupancy import projections
from tp_generate import CONFIGS, random_llama
from triton.testing import do_bench

import tritonize
from tritonize.generation.api import ENGINE_ATTRIBUTE, _engine
from tritonize.kernels import gemv

PROMPT_LEN = 128
FIELDS = {field.name for field in dataclasses.fields(gemv.GemvConfig)}


TARGETS = (*projections(CONFIGS["llama-1.7gb"]), "*")  # projection names, or all


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, int]] | Path]:
    """'NAME=SETTINGS' -> (NAME, {projection or "*": {field: value}}), or (NAME, Path) for 'NAME=@FILE'."""
    name, equals, settings = text.partition("=")
    if not name or not equals:
        raise ValueError(f"a variant is NAME=SETTINGS or NAME=@FILE, got {text!r}")
    if settings.startswith("@"):
        return name, Path(settings[1:])
    changes: dict[str, dict[str, int]] = {}
    for item in filter(None, settings.split(",")):
        target, _, value = item.partition("=")
        projection, _, field = target.partition(".")
        if projection not in TARGETS or field not in FIELDS or not value.isdigit():
            raise ValueError(f"variant {name!r}: {item!r} is not PROJECTION.FIELD=INTEGER with PROJECTION one of "
                             f"{', '.join(TARGETS)} and FIELD one of {', '.join(sorted(FIELDS))}")
        changes.setdefault(projection, {})[field] = int(value)
    return name, changes


def config_picker(changes: dict[str, dict[str, int]], shapes: dict[tuple[int, int], str], shipped_pick):
    """A `pick_config` that applies the variant's changes to the shipped choice, by projection (found by N, K)."""

    def pick(M: int, N: int, K: int, dtype: torch.dtype) -> gemv.GemvConfig:
        merged = {**changes.get("*", {}), **changes.get(shapes.get((N, K), ""), {})}
        return dataclasses.replace(shipped_pick(M, N, K, dtype), **merged)

    return pick


def kernel_copy(path: Path):
    """(gemv_fwd, pick_config) of another copy of kernels/gemv.py."""
    spec = importlib.util.spec_from_file_location(f"gemv_copy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.gemv_fwd, module.pick_config


def fixed_position_step(model, ids: torch.Tensor):
    """A function running one decode step of the model's engine after prefilling ids [batch, prompt], always at
    the same position (each call resets the lengths first): every call, or CUDA-graph replay, does the same
    work. Call under torch.no_grad()."""
    engine = _engine(model)
    engine.reserve(ids.shape[0], ids.shape[1] + 64)
    engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    tokens, seqlens = ids[:, -1].clone(), engine.cache_seqlens.clone()

    def step() -> torch.Tensor:
        engine.cache_seqlens.copy_(seqlens)
        return engine.step(tokens)

    return step


def decode_rate(model, ids: torch.Tensor) -> float:
    """New tokens per second of tritonize.generate between 32 and 256 new tokens (medians of 3 calls)."""
    if hasattr(model, ENGINE_ATTRIBUTE):  # a fresh engine: its graphs capture this variant's kernels
        delattr(model, ENGINE_ATTRIBUTE)
    mask = torch.ones_like(ids)
    tritonize.generate(model, ids, mask, max_new_tokens=256, eos_token_id=[])
    seconds = {}
    for new_tokens in (32, 256):
        runs = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tritonize.generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[])
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        seconds[new_tokens] = statistics.median(runs)
    return (256 - 32) / (seconds[256] - seconds[32])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1.7gb", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1, choices=range(1, gemv.GEMV_MAX_M + 1))
    parser.add_argument("--variant", action="append", required=True, help="NAME=SETTINGS or NAME=@FILE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--generate", type=int, default=2, help="decode rates for the first and this many fastest")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times CUDA-graph replays")
    try:
        variants = dict(parse_variant(text) for text in args.variant)
    except ValueError as error:
        parser.error(str(error))
    if len(variants) < len(args.variant):
        parser.error("two variants have the same name")
    settings = dict(zip(variants, args.variant, strict=True))  # name -> the text given
    shapes = {(N, K): name for name, (N, K, _) in projections(CONFIGS[args.config]).items()}
    shipped = (gemv.gemv_fwd, gemv.pick_config)
    kernels = {name: kernel_copy(v) if isinstance(v, Path) else (shipped[0], config_picker(v, shapes, shipped[1]))
               for name, v in variants.items()}

    def use(name: str) -> None:
        gemv.gemv_fwd, gemv.pick_config = kernels[name]

    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}: {args.config} bf16, batch {args.batch}")
    model = random_llama(args.config, torch.bfloat16, torch.device("cuda"))
    ids = torch.randint(2, model.config.vocab_size - 1, (args.batch, PROMPT_LEN), device="cuda")
    use(next(iter(kernels)))
    tritonize.generate(model, ids, torch.ones_like(ids), max_new_tokens=8, eos_token_id=[])  # compiles the rest
    graphs, logits = {}, {}
    with torch.no_grad():
        step = fixed_position_step(model, ids)
        for name in kernels:
            use(name)
            logits[name] = step().float()
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                step()
        step_us = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                step_us[name].append(do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3)
    del graphs
    first = next(iter(kernels))
    results = {}
    for name in kernels:
        difference = (logits[name] - logits[first]).norm() / logits[first].norm()
        results[name] = dict(settings=settings[name], step_us=step_us[name],
                             step_us_median=statistics.median(step_us[name]),
                             logits_relative_difference=difference.item())
    fastest = sorted((r["step_us_median"], name) for name, r in results.items() if name != first)
    for name in [first] + [name for _, name in fastest[:args.generate]]:
        use(name)
        results[name]["decode_tokens_per_s"] = decode_rate(model, ids)
    print_step_table({r["settings"]: r for r in results.values()}, results[first]["settings"])
    out = Path(args.out) / f"ab-decode-gemv-{args.config}-b{args.batch}-{card.lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                                   date=time.strftime("%Y-%m-%d"), config=args.config, batch=args.batch,
                                   prompt_len=PROMPT_LEN, results=results), indent=1))
    print(f"wrote {out}")


def print_step_table(results: dict[str, dict], baseline: str) -> None:
    """The A/B table of `results` by variant: the step replay's median and rounds (us), its speed-up over
    `baseline`'s, the logits' difference and the decode rate where measured."""
    base = results[baseline]["step_us_median"]
    print(f"| variant | step replay us (median of rounds) | rounds | vs {baseline} | logits rel. diff "
          "| decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = r.get("decode_tokens_per_s")
        print(f"| {name} | {r['step_us_median']:.1f} | {', '.join(f'{t:.1f}' for t in r['step_us'])} | "
              f"{base / r['step_us_median']:.3f}x | {r['logits_relative_difference']:.2g} | "
              f"{'-' if rate is None else f'{rate:.0f}'} |")


if __name__ == "__main__":
    main()

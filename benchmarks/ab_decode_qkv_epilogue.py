"""A/B of the decode step with rotary and the KV-cache write fused into the QKV projection's GEMV epilogue
(`DecoderEngine.fuse_qkv_epilogue`, the default) against the unfused kernels (the projection's GEMV, then
`rotary_cache_write`'s kernel), in one process on one GPU.

For each batch size (1 and 2 by default: every projection a GEMV), one `DecoderEngine.step` of a random
Llama-style model in bf16 is captured in a CUDA graph per variant and its replay timed
(`triton.testing.do_bench`, median) in interleaved rounds, so drift hits both alike; the unfused step's
logits are compared with the fused one's (the same bits are expected: the fused epilogue rounds the
projection to bf16 before rotating, as the unfused GEMV stores it). Then `tritonize.generate`'s decode rate
(new tokens per second between 32 and 256 new tokens) for each variant, unless --no-generate.

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/ab_decode_qkv_epilogue.py --out DIR
    [--config llama-1.7gb] [--batch 1 2] [--rounds 3] [--no-generate]
Prints a table and writes ab-decode-qkv-epilogue-<config>-<card>.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton
from ab_decode_gemv import PROMPT_LEN, engine_decode_rate, time_decode_steps
from tp_generate import CONFIGS, random_llama

import tritonize
from tritonize.generation.api import _engine
from tritonize.kernels import gemv

VARIANTS = {"fused": True, "unfused": False}  # name: DecoderEngine.fuse_qkv_epilogue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1.7gb", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], choices=range(1, gemv.GEMV_MAX_M + 1),
                        help="batch sizes, each at most gemv.GEMV_MAX_M (the fusion's range)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-generate", dest="generate", action="store_false", help="skip the decode rates")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if len(set(args.batch)) < len(args.batch):
        parser.error("a batch size is given twice")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def use(model: torch.nn.Module, variant: str) -> None:
    """The engine cached on the model runs `variant` from now on (its decode graphs dropped: they hold the other)."""
    engine = _engine(model)
    engine.fuse_qkv_epilogue = VARIANTS[variant]
    engine.decode_graphs.clear()


def measure(model: torch.nn.Module, batch: int, rounds: int, generate: bool) -> dict[str, dict]:
    """Step replay times (per round), logits difference to the fused step and decode rates, per variant."""
    ids = torch.randint(2, model.config.vocab_size - 1, (batch, PROMPT_LEN), device="cuda")
    tritonize.generate(model, ids, torch.ones_like(ids), max_new_tokens=8, eos_token_id=[])  # compiles the rest
    step_us, logits = time_decode_steps(model, ids, list(VARIANTS), lambda name: use(model, name), rounds)
    results = {}
    for name in VARIANTS:
        difference = (logits[name] - logits["fused"]).norm() / logits["fused"].norm()
        results[name] = dict(fuse_qkv_epilogue=VARIANTS[name], step_us=step_us[name],
                             step_us_median=statistics.median(step_us[name]),
                             logits_relative_difference=difference.item(),
                             logits_identical=torch.equal(logits[name], logits["fused"]))
        if generate:
            use(model, name)
            results[name]["decode_tokens_per_s"] = engine_decode_rate(model, ids)
    use(model, "fused")
    return results


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ab_decode_qkv_epilogue.py needs a CUDA GPU: it times CUDA-graph replays")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}: {args.config} bf16")
    model = random_llama(args.config, torch.bfloat16, torch.device("cuda"))
    by_batch = {batch: measure(model, batch, args.rounds, args.generate) for batch in args.batch}
    print("| batch | variant | step replay us (median of rounds) | rounds | unfused / fused | logits rel. diff | "
          "decode tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for batch, results in by_batch.items():
        for name, r in results.items():
            rate = r.get("decode_tokens_per_s")
            print(f"| {batch} | {name} | {r['step_us_median']:.1f} | {', '.join(f'{t:.1f}' for t in r['step_us'])} | "
                  f"{results['unfused']['step_us_median'] / results['fused']['step_us_median']:.3f}x | "
                  f"{r['logits_relative_difference']:.2g} | {'-' if rate is None else f'{rate:.0f}'} |")
    out = Path(args.out) / f"ab-decode-qkv-epilogue-{args.config}-{card.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                                   date=time.strftime("%Y-%m-%d"), config=args.config, prompt_len=PROMPT_LEN,
                                   rounds=args.rounds, results={f"b{batch}": r for batch, r in by_batch.items()}),
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

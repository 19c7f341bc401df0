"""A/B of the decode step with and without the persistent layer kernel (`ops.decoder_layer_chain`), on a GPU.

The decode step of a Llama-style model at batch 1 or 2 runs each layer's GEMVs after attention either as four
GEMV launches (`unchained`, the default) or as one persistent kernel whose phases are joined by grid
barriers (`TRITONIZE_DECODE_LAYER_CHAIN=1`; kernels/gemv_chain.py). For each variant one `DecoderEngine.step`
is captured in a CUDA graph and its replay timed (`triton.testing.do_bench`, median) in interleaved rounds;
its logits are compared with the unchained step's. Variants of the chain: `chained` (the shipped choice:
block_k 1024, reads running on from one row block into the next), `chained-nostream` (each block's first
tiles loaded at its start), `chained-bk512` (block_k 512: fewer registers, more programs per SM). Then
`tritonize.generate`'s decode rate (new tokens per second between 32 and 256 new tokens) unchained and
chained.

Usage (GPU): PYTHONPATH=src python benchmarks/ab_decode_chain.py [--config llama-1.7gb] [--batch 1]
    [--rounds 3] [--out DIR]
Writes ab-decode-chain-<config>-b<batch>-<card>.json to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import triton
from ab_decode_gemv import PROMPT_LEN, decode_rate, fixed_position_step, print_step_table
from tp_generate import CONFIGS, random_llama
from triton.testing import do_bench

import tritonize
from tritonize.generation.api import _engine
from tritonize.generation.settings import DECODE_LAYER_CHAIN_ENV
from tritonize.kernels import gemv, gemv_chain

VARIANTS = {  # name: (chain on, layer_chain_fwd keyword arguments)
    "unchained": (False, {}),
    "chained": (True, {}),
    "chained-nostream": (True, {"stream": False}),
    "chained-bk512": (True, {"config": gemv.GemvConfig(block_n=4, block_k=512, num_stages=1)}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1.7gb", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1, choices=range(1, gemv.GEMV_MAX_M + 1))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times CUDA-graph replays")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}: {args.config} bf16, batch {args.batch}")
    model = random_llama(args.config, torch.bfloat16, torch.device("cuda"))
    ids = torch.randint(2, model.config.vocab_size - 1, (args.batch, PROMPT_LEN), device="cuda")
    tritonize.generate(model, ids, torch.ones_like(ids), max_new_tokens=8, eos_token_id=[])  # compiles the rest
    engine = _engine(model)
    shipped = gemv_chain.layer_chain_fwd
    graphs, logits, first_call_s, failed = {}, {}, {}, {}
    with torch.no_grad():
        step = fixed_position_step(model, ids)
        for name, (chain, options) in VARIANTS.items():
            engine.chain_layers = chain
            gemv_chain.layer_chain_fwd = functools.partial(shipped, **options)
            try:
                start = time.perf_counter()
                logits[name] = step().float()
                torch.cuda.synchronize()
                first_call_s[name] = time.perf_counter() - start  # the chain's compile included
                graphs[name] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[name]):
                    step()
            except Exception as error:  # noqa: BLE001 - a variant that cannot run is reported, the others timed
                failed[name] = f"{type(error).__name__}: {error}"
                graphs.pop(name, None)
                print(f"{name}: {failed[name]}")
        gemv_chain.layer_chain_fwd = shipped
        step_us = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                step_us[name].append(do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3)
    del graphs
    results = {}
    for name, times in step_us.items():
        reference = logits["unchained"]
        difference = (logits[name] - reference).norm() / reference.norm()
        results[name] = dict(step_us=times, step_us_median=statistics.median(times), first_call_s=first_call_s[name],
                             logits_relative_difference=difference.item(),
                             same_next_tokens=bool(torch.equal(logits[name].argmax(-1), reference.argmax(-1))))
    engine.chain_layers = False
    for name, chain in (("unchained", "0"), ("chained", "1")):
        if name in results:
            os.environ[DECODE_LAYER_CHAIN_ENV] = chain  # decode_rate builds a new engine, which reads it
            results[name]["decode_tokens_per_s"] = decode_rate(model, ids)
    os.environ.pop(DECODE_LAYER_CHAIN_ENV)
    print_step_table(results, "unchained")
    out = Path(args.out) / f"ab-decode-chain-{args.config}-b{args.batch}-{card.lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                                   date=time.strftime("%Y-%m-%d"), config=args.config, batch=args.batch,
                                   prompt_len=PROMPT_LEN, results=results, failed=failed), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Command line: `tritonize bench-kernels` (kernel micro-benchmarks on a CUDA GPU) and `tritonize debug`
(one kernel run bounds-checked on CPU through Triton's interpreter, compared with its reference)."""

from __future__ import annotations

import argparse
from pathlib import Path

PARTS = ("attention", "linear", "norm", "embedding-norm", "decode-attention", "gated-mlp", "rotary")
# Run by default: the parts already measured on a GPU; the others (generation kernels, the embeddings + norm)
# are opt-in until they are.
DEFAULT_PARTS = ("attention", "linear", "norm")
DEBUG_KERNELS = ("attention", "linear", "layer_norm", "rms_norm")
DEBUG_EPILOG = """\
--shape per kernel (comma-separated positive integers):
  attention   batch,heads,q_len,kv_len,head_dim[,kv_heads]  (random key padding mask; --causal)
  linear      M,N,K      x [M, K] @ weight [N, K]^T + bias, GELU, + residual
  layer_norm  rows,cols  with weight, bias and residual
  rms_norm    rows,cols  with weight and residual

examples:
  tritonize debug linear --shape 33,40,70
  tritonize debug attention --shape 2,8,100,130,64,2 --causal --dtype float16
  TRITON_INTERPRET=1 tritonize debug rms_norm --shape 5,1000 --dtype bfloat16

Prints OK, the out-of-bounds access, or the relative error that is too large (exit status 1).
"""


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench-kernels times kernels on a CUDA GPU and none is visible here. "
              "Run the test suite (TRITON_INTERPRET=1 pytest) to check the kernels on CPU.")
        return 2
    from tritonize.bench import kernels
    from tritonize.bench.report import markdown_table, write_results

    payload = kernels.run(tuple(args.parts), quick=args.quick, sweep=args.sweep)
    rows = payload["rows"]
    name = "kernel-sweep" if args.sweep else "kernels"
    if set(args.parts) != set(DEFAULT_PARTS):
        name += "-" + "-".join(args.parts)
    path = write_results(name, payload, Path(args.out))
    print(markdown_table(rows))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def _debug(args: argparse.Namespace) -> int:
    import torch

    from tritonize.debug import OutOfBoundsError, check_kernel

    try:
        shape = [int(dim) for dim in args.shape.split(",")]
    except ValueError:
        print(f"error: --shape takes comma-separated integers, got {args.shape!r}")
        return 2
    try:
        result = check_kernel(args.kernel, shape, getattr(torch, args.dtype), causal=args.causal, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    except OutOfBoundsError as err:
        print(f"OUT OF BOUNDS: {err}")
        return 1
    verdict = "OK" if result.ok else "FAIL"
    print(f"{verdict} {args.kernel} --shape {args.shape} {args.dtype}: relative error {result.relative_error:.2e} "
          f"(tolerance {result.tolerance:.1e}); launches: {', '.join(result.launches)}")
    return 0 if result.ok else 1


def _bench_model(args: argparse.Namespace) -> int:
    import torch

    from tritonize.bench import models

    if not torch.cuda.is_available():
        error, cosine = models.accuracy_on_cpu(args.model)
        print(f"no CUDA GPU: checked accuracy only. {args.model}, batch 2 x 12 tokens with padding, "
              f"tritonize vs fp32 eager: relative error {error:.2e}, lowest cosine of the sentence embeddings "
              f"{cosine:.7f}. Timings need a CUDA GPU.")
        return 0 if error < 1e-3 and cosine >= 0.9999 else 1
    from tritonize.bench.report import markdown_table, write_results

    payload = models.run(args.model, max_autotune=args.max_autotune, tune=args.tune, engines_wanted=args.engines)
    rows = payload["rows"]
    path = write_results(f"bench-{args.model}", payload, Path(args.out))
    print(markdown_table(rows))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench-generate times generation on a CUDA GPU and none is visible here. "
              "The test suite checks generated tokens against HF on CPU.")
        return 2
    from tritonize.bench import generation
    from tritonize.bench.report import markdown_table, write_results

    payload = generation.run(tuple(args.models), args.engines, tune=args.tune)
    rows = payload["rows"]
    path = write_results("bench-generate-" + "-".join(args.models), payload, Path(args.out))
    print(markdown_table(rows))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def models_engines() -> tuple[str, ...]:
    from tritonize.bench.models import ENGINES

    return ENGINES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench-kernels", help="time every kernel against the PyTorch way of doing the same")
    bench.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS,
                       help="default: %(default)s")
    bench.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    bench.add_argument("--sweep", action="store_true",
                       help="time every candidate block config instead (to tune the tables)")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown results")
    bench.set_defaults(handler=_bench_kernels)
    model_bench = sub.add_parser("bench", help="time an encoder: tritonize vs HF eager, HF sdpa and torch.compile")
    model_bench.add_argument("--model", default="minilm",
                             help="minilm (real all-MiniLM-L6-v2, default), bert-base, roberta-base, distilbert, "
                                  "electra-base or xlm-roberta-base (random weights)")
    model_bench.add_argument("--max-autotune", action="store_true", help="also time compile mode max-autotune")
    model_bench.add_argument("--engines", nargs="+", choices=models_engines(),
                             help="time only these engines (default: all; max-autotune with --max-autotune)")
    model_bench.add_argument("--tune", action="store_true",
                             help="optimize_model(tune=True): time kernel configs on each new shape first and "
                                  "store the fastest in the tuning cache ($TRITONIZE_TUNING_CACHE)")
    model_bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown results")
    model_bench.set_defaults(handler=_bench_model)
    gen = sub.add_parser("bench-generate", help="time tritonize.generate vs HF generate (Llama-style 1.7 GB, T5-base)")
    gen.add_argument("--models", nargs="+", default=["llama", "t5"], choices=["llama", "t5"])
    gen.add_argument("--engines", nargs="+", choices=["hf-generate-dynamic-cache", "hf-generate-static-cache",
                                                      "tritonize"], help="time only these engines (default: all)")
    gen.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown results")
    gen.add_argument("--tune", action="store_true",
                     help="time kernel configs for each new linear shape on tritonize's first call and store the "
                          "fastest in the tuning cache ($TRITONIZE_TUNING_CACHE) before timing")
    gen.set_defaults(handler=_bench_generate)
    debug = sub.add_parser("debug", help="run one kernel bounds-checked on CPU and compare it with its reference",
                           epilog=DEBUG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    debug.add_argument("kernel", choices=DEBUG_KERNELS)
    debug.add_argument("--shape", required=True, help="comma-separated sizes, per kernel as below")
    debug.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    debug.add_argument("--causal", action="store_true", help="attention only: causal mask")
    debug.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    debug.set_defaults(handler=_debug)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

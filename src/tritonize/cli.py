"""Command line: `tritonize bench-kernels` (kernel micro-benchmarks on a CUDA GPU)."""

from __future__ import annotations

import argparse
from pathlib import Path

PARTS = ("attention", "linear", "norm")


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
    if set(args.parts) != set(PARTS):
        name += "-" + "-".join(args.parts)
    path = write_results(name, payload, Path(args.out))
    print(markdown_table(rows))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench-kernels", help="time attention, linear and norm kernels against PyTorch")
    bench.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    bench.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    bench.add_argument("--sweep", action="store_true",
                       help="time every candidate block config instead (to tune the tables)")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown results")
    bench.set_defaults(handler=_bench_kernels)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

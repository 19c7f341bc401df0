"""Decode-size linear layers on the GPU: the GEMV kernel's configs against the tensor-core skinny path and
cuBLAS, at the weight shapes of the Llama-style 1.7 GB and 8B configs.

Each case times a CUDA graph that runs the layer once on each of several copies of its weight (together
at least 3x the L2 cache, so every read comes from HBM as in a real decode step) and reports the time per
layer, its bytes per second against the measured copy bandwidth, and for the best GEMV config the same
with programmatic dependent launch (PDL) between the consecutive launches.

Usage (on the GPU machine): PYTHONPATH=src python benchmarks/sweep_gemv.py [--out DIR] [--quick]
Writes sweep-gemv-<card>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

from tritonize.kernels.gated_mlp import gated_mlp_fwd
from tritonize.kernels.gemv import GemvConfig, gemv_fwd, pick_config
from tritonize.kernels.linear import linear_fwd
from tritonize.kernels.norm import rms_norm_fwd

# (name, N, K, kind): kind "norm" = RMSNorm + projection, "residual" = projection + residual add,
# "gated_norm" = RMSNorm + gated MLP (N = intermediate size, weight [2N, K])
SHAPES = {
    "llama-1.7gb": [("qkv", 3072, 2048, "norm"), ("o", 2048, 2048, "residual"),
                    ("gate_up", 5632, 2048, "gated_norm"), ("down", 2048, 5632, "residual"),
                    ("lm_head", 32000, 2048, "norm")],
    "llama-8b": [("qkv", 6144, 4096, "norm"), ("o", 4096, 4096, "residual"),
                 ("gate_up", 14336, 4096, "gated_norm"), ("down", 4096, 14336, "residual"),
                 ("lm_head", 128256, 4096, "norm")],
}
SWEEP = [GemvConfig(block_n, block_k, warps, num_stages=1)  # the loop is double-buffered by hand: stages change nothing
         for block_n in (1, 2, 4, 8, 16) for block_k in (256, 512, 1024, 2048)
         for warps in (1, 2, 4, 8) if 1024 <= block_n * block_k <= 16384 and block_k >= 32 * warps * 8]
L2_MULTIPLE = 3


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench_cudagraph(lambda: dst.copy_(src), rep=50, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3)


def make_case(M: int, N: int, K: int, kind: str, dtype: torch.dtype):
    rows = 2 * N if kind == "gated_norm" else N
    weight_bytes = rows * K * dtype.itemsize
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(1, triton.cdiv(L2_MULTIPLE * l2, weight_bytes))
    weights = [torch.randn(rows, K, dtype=dtype, device="cuda") / K**0.5 for _ in range(copies)]
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    norm_weight = torch.rand(K, dtype=dtype, device="cuda") + 0.5
    residual = torch.randn(M, N, dtype=dtype, device="cuda")
    out = torch.empty(M, N, dtype=dtype, device="cuda")
    return weights, x, norm_weight, residual, out, weight_bytes


def time_per_layer(launch, copies: int) -> float | None:
    try:
        return do_bench_cudagraph(launch, rep=30, return_mode="median") / copies
    except (OutOfResources, RuntimeError):  # too many registers / shared memory for this config
        return None


def run_case(M, N, K, kind, dtype, configs, gbps) -> dict:
    weights, x, g, residual, out, weight_bytes = make_case(M, N, K, kind, dtype)
    gated, norm = kind == "gated_norm", kind in ("norm", "gated_norm")
    res = residual if kind == "residual" else None
    bytes_moved = weight_bytes + (x.numel() + out.numel()) * dtype.itemsize

    def gemv(config, pdl):
        def launch():
            for w in weights:
                gemv_fwd(x, w, None, "silu" if gated else None, res, gated=gated,
                         rms_norm_weight=g if norm else None, rms_norm_eps=1e-6, out=out, config=config, pdl=pdl)
        return launch

    def skinny():  # what decode ran before: the norm kernel, then the tensor-core skinny path (split-K)
        for w in weights:
            xn = rms_norm_fwd(x, g, 1e-6, None, "llama")[0] if norm else x
            if gated:
                gated_mlp_fwd(xn, w, None, "silu", out=out)
            else:
                linear_fwd(xn, w, None, None, res, out=out)

    def cublas():  # the GEMM alone (no norm, activation or residual)
        for w in weights:
            F.linear(x, w)

    def result(ms):
        return None if ms is None else {"us": ms * 1e3, "gbps": bytes_moved / (ms * 1e-3) / 1e9,
                                        "fraction_of_copy_bandwidth": bytes_moved / (ms * 1e-3) / gbps}

    # the heuristic config's result against PyTorch first (a fast wrong kernel is no result)
    xn = F.rms_norm(x.float(), (K,), eps=1e-6).to(dtype).float() * g.float() if norm else x.float()
    y = xn.to(dtype).float() @ weights[0].float().T
    expected = F.silu(y[:, :N]) * y[:, N:] if gated else y + (res.float() if res is not None else 0)
    got = gemv_fwd(x, weights[0], None, "silu" if gated else None, res, gated=gated,
                   rms_norm_weight=g if norm else None, rms_norm_eps=1e-6)
    error = ((got.float() - expected).norm() / expected.norm()).item()
    if error > 2e-2:
        raise AssertionError(f"gemv M={M} N={N} K={K} {kind}: relative error {error:.2e}")

    timed = {}
    for config in configs:
        timed[config] = time_per_layer(gemv(config, pdl=False), len(weights))
    ok = {c: ms for c, ms in timed.items() if ms is not None}
    best = min(ok, key=ok.get)
    heuristic = pick_config(M, N, K, dtype)
    heuristic_ms = ok.get(heuristic) or time_per_layer(gemv(heuristic, pdl=False), len(weights))
    return {
        "M": M, "N": N, "K": K, "kind": kind, "weight_mb": weight_bytes / 1e6, "relative_error": error,
        "skinny_tensor_core": result(time_per_layer(skinny, len(weights))),
        "cublas_gemm_only": result(time_per_layer(cublas, len(weights))),
        "gemv_heuristic": {"config": dataclasses.asdict(heuristic), **result(heuristic_ms)},
        "gemv_best": {"config": dataclasses.asdict(best), **result(ok[best])},
        "gemv_best_pdl": result(time_per_layer(gemv(best, pdl=True), len(weights))),
        "gemv_heuristic_pdl": result(time_per_layer(gemv(heuristic, pdl=True), len(weights))),
        "gemv_top5": [{"config": dataclasses.asdict(c), "us": ok[c] * 1e3} for c in sorted(ok, key=ok.get)[:5]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="the 1.7 GB shapes at M = 1 only")
    args = parser.parse_args()
    dtype, card = torch.bfloat16, torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).isoformat()
    gbps = copy_bandwidth()
    print(f"{card}: copy bandwidth {gbps / 1e12:.2f} TB/s; {len(SWEEP)} GEMV configs")
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep-gemv-{card.lower().replace(' ', '-')}.json"
    for model, shapes in SHAPES.items():
        for M in ((1,) if args.quick else (1, 2)):
            for name, N, K, kind in shapes:
                if args.quick and model != "llama-1.7gb":
                    continue
                # the whole sweep at M = 1 of the small model; elsewhere the heuristic and its neighbours
                full = model == "llama-1.7gb" and M == 1
                configs = SWEEP if full else list(dict.fromkeys(
                    [pick_config(M, N, K, dtype), *[c for c in SWEEP if c.num_warps == 4]]))
                r = {"model": model, "layer": name, **run_case(M, N, K, kind, dtype, configs, gbps)}
                results.append(r)
                fmt = lambda d: "-" if d is None else f"{d['us']:7.1f} us {d['fraction_of_copy_bandwidth']:5.0%}"  # noqa: E731
                print(f"{model:12s} M={M} {name:8s} skinny {fmt(r['skinny_tensor_core'])} | cublas "
                      f"{fmt(r['cublas_gemm_only'])} | gemv heur {fmt(r['gemv_heuristic'])} | best "
                      f"{fmt(r['gemv_best'])} {r['gemv_best']['config']} | pdl {fmt(r['gemv_best_pdl'])} "
                      f"heur pdl {fmt(r['gemv_heuristic_pdl'])}", flush=True)
                # rewritten after every case: a run cut short keeps what it measured
                path.write_text(json.dumps({"card": card, "date": date, "torch": torch.__version__,
                                            "triton": triton.__version__, "copy_bandwidth_bytes_per_s": gbps,
                                            "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""How the decode GEMV fills an H100, without a GPU: each projection's kernel compiled for sm_90 as
`gemv.gemv_fwd` would launch it, its registers per thread (cuobjdump on the cubin), the programs that fit on
one SM at once, and the waves its grid makes.

A projection of a few MB streams for only a few microseconds, so a grid of 1.45 waves (the last wave runs
on part of the SMs) or programs too short to reach full bandwidth cost a visible share of it. This shows
both for any decoder's shapes before a GPU is at hand; what the GPU then measures is the judge.

Usage: python benchmarks/gemv_occupancy.py [--config llama-1.7gb] [--batch 1] [--sms 132] [--json FILE]
(run without TRITON_INTERPRET: the kernel must be the compiled one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from tp_generate import CONFIGS

from tritonize.debug import compile_for_gpu
from tritonize.kernels import gemv

# Hopper (sm_90) per-SM limits: registers, threads, resident programs, shared memory (bytes, 1 KB of it
# reserved per program), and the register allocation unit (registers per warp, in multiples of 256).
REGISTERS, THREADS, PROGRAMS, SHARED, SHARED_RESERVED, REGISTER_UNIT = 65536, 2048, 32, 233472, 1024, 256
DTYPE, POINTER_TYPE = torch.bfloat16, "*bf16"  # the decode step's weights and activations

def projections(config: dict) -> dict[str, tuple]:
    """(N, K, kernel flags) of each projection of a Llama-style decoder layer, and of the lm_head, as the
    decode step launches them (norms fused into the QKV, gate/up and lm_head GEMVs); config: the HF Llama
    config's fields (tp_generate.CONFIGS)."""
    hidden, intermediate, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden, dict(RMS_NORM=True)),
        "o": (hidden, hidden, dict(HAS_RESIDUAL=True)),
        "gate_up": (intermediate, hidden, dict(RMS_NORM=True, GATED=True, ACTIVATION="silu")),
        "down": (hidden, intermediate, dict(HAS_RESIDUAL=True)),
        "lm_head": (vocab, hidden, dict(RMS_NORM=True)),
    }


def registers_per_thread(kernel) -> int:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def occupancy(M: int, N: int, K: int, flags: dict, sms: int) -> dict:
    config = gemv.pick_config(M, N, K, DTYPE)
    constexprs = dict(HAS_BIAS=False, ACTIVATION="none", HAS_RESIDUAL=False, RMS_NORM=False, GATED=False,
                      BLOCK_M=triton.next_power_of_2(M), BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=True)
    constexprs.update(flags)
    pointers = ("X_ptr", "W_ptr", "B_ptr", "R_ptr", "Y_ptr", "G_ptr")
    # the integer arguments gemv_fwd passes, specialized as the JIT does (multiples of 16, ones)
    values = dict(M=M, N=N, K=K, x_row_stride=K, w_row_stride=K, r_row_stride=N, r_col_stride=1)
    kernel = compile_for_gpu(gemv._gemv_kernel, {**{p: POINTER_TYPE for p in pointers}, "eps": "fp32"}, constexprs,
                             values=values, num_warps=config.num_warps, num_stages=config.num_stages,
                             options=dict(launch_pdl=True))
    registers = registers_per_thread(kernel)
    threads = 32 * config.num_warps
    warp_registers = triton.cdiv(registers * 32, REGISTER_UNIT) * REGISTER_UNIT
    shared = kernel.metadata.shared + SHARED_RESERVED
    per_sm = min(REGISTERS // (warp_registers * config.num_warps), THREADS // threads, PROGRAMS, SHARED // shared)
    programs = triton.cdiv(N, config.block_n)
    weight_bytes = N * (2 if flags.get("GATED") else 1) * K * DTYPE.itemsize
    return dict(N=N, K=K, config=str(config), registers_per_thread=registers, shared_bytes=kernel.metadata.shared,
                programs_per_sm=per_sm, programs=programs, waves=programs / (per_sm * sms),
                weight_bytes_per_program=weight_bytes // programs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1.7gb", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1, choices=range(1, gemv.GEMV_MAX_M + 1))
    parser.add_argument("--sms", type=int, default=132, help="SMs of the card (H100 SXM: 132)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    if triton.knobs.runtime.interpret:
        parser.error("run without TRITON_INTERPRET=1: this compiles the kernel for sm_90")
    rows = {name: occupancy(args.batch, N, K, flags, args.sms)
            for name, (N, K, flags) in projections(CONFIGS[args.config]).items()}
    print(f"{args.config}, batch {args.batch}, sm_90, {args.sms} SMs")
    print("| projection | N x K | config | registers / thread | programs / SM | programs | waves | KB / program |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['N']} x {row['K']} | {row['config']} | {row['registers_per_thread']} | "
              f"{row['programs_per_sm']} | {row['programs']} | {row['waves']:.2f} | "
              f"{row['weight_bytes_per_program'] / 1024:.0f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(config=args.config, batch=args.batch, sms=args.sms, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()

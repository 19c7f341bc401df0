"""A Triton kernel compiled for a GPU architecture on any machine, no GPU needed: its PTX, cubin and
metadata, to read what the compiler made of it (instruction order, registers, shared memory).

Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_gpu(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, object],
    *,
    values: dict[str, int] | None = None,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    options: dict | None = None,
):
    """`kernel` (a `triton.jit` function, e.g. `tritonize.kernels.norm._layer_norm_fwd_kernel`) compiled for
    CUDA compute capability `arch` (90: H100 / H200); returns Triton's compiled kernel (`.asm["ptx"]`,
    `.asm["cubin"]`, `.metadata.shared`, ...).

    types: the Triton type of each pointer and float argument by name ("*fp16", "*bf16", "fp32", ...);
    every other non-constexpr argument is taken as "i32". constexprs: the value of every constexpr argument.
    values: integer arguments' values at the launch to reproduce, specialized as Triton's JIT does (a
    multiple of 16 is compiled as known to be one, which lets loads become 16-byte vectors; 1 as the
    constant 1); integers not given are compiled as unknown. Pointers are compiled as 16-byte aligned, as
    the JIT sees torch's allocations. options: further compile options (e.g. launch_pdl).
    Needs the compiled kernels: raises RuntimeError under TRITON_INTERPRET=1.
    """
    if triton.knobs.runtime.interpret:
        raise RuntimeError("compile_for_gpu needs the kernels compiled, not interpreted: run without "
                           "TRITON_INTERPRET=1")
    names = kernel.arg_names
    values = values or {}
    unknown = (set(types) | set(constexprs) | set(values)) - set(names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no argument(s) {sorted(unknown)}; its arguments: {names}")
    constexprs = {**constexprs, **{name: 1 for name, value in values.items() if value == 1}}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    aligned = [name for name in names if signature[name].startswith("*")]
    aligned += [name for name, value in values.items() if value != 1 and value % 16 == 0]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **(options or {})))

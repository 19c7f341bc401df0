"""Helpers shared by the Triton kernels: interpreter detection, and a dot and a cast that are exact there.

Must never import torch.fx, Dynamo or transformers.
"""

import functools
import re
import warnings

import numpy
import torch
import triton
import triton.language as tl

# Decided once, at import: `triton.jit` returns interpreted functions when TRITON_INTERPRET=1 was set
# before the kernels were decorated, and they then run on CPU tensors (how CI tests every kernel).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def interpreter_numpy_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels with the installed numpy, or None: Triton 3.6's
    interpreter fails on any loop whose bound is a runtime argument under numpy >= 2.4 ("only 0-dimensional
    arrays can be converted to Python scalars")."""
    major_minor = re.match(r"(\d+)\.(\d+)", numpy.__version__)
    numpy_version = tuple(map(int, major_minor.groups())) if major_minor else (0, 0)
    if triton.__version__.startswith("3.6.") and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails on loops with runtime bounds under numpy "
                f"{numpy.__version__}; install numpy<2.4 to run the kernels interpreted")
    return None


if INTERPRETED and (_problem := interpreter_numpy_problem()) is not None:
    warnings.warn(f"TRITON_INTERPRET=1: {_problem}", RuntimeWarning, stacklevel=2)

# Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot and truncates fp32 -> bf16 casts
# instead of rounding to nearest even; `dot` and `cast` correct both so CPU tests stay faithful to the GPU.
# Compiled kernels never take these branches.
_FIX_INTERPRETER_BF16: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tl.dot, corrected for the interpreter's bf16 bug)."""
    if _FIX_INTERPRETER_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def cast(value, dtype: tl.constexpr):
    """value.to(dtype) with round-to-nearest-even, also under the interpreter."""
    if _FIX_INTERPRETER_BF16:
        if dtype == tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@functools.cache
def card_name(device: torch.device) -> str:
    """What per-card tables (the tuning cache, gemv.MAX_WEIGHT_BYTES) are keyed by: the CUDA device's name, or
    "triton-interpreter" for CPU tensors."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (exact "ieee" unless TF32 was allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# -- programmatic dependent launch (PDL, Hopper and newer) --------------------------------------------
# A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream still runs,
# as soon as every program of that one has let the next kernel launch (or exited): it can load what the
# previous kernel does not write (weights) and must call `wait_previous_allow_next` before touching
# anything else. Kernels take a `PDL: tl.constexpr` flag, `pdl_supported(device)`, since the instructions
# exist from sm_90 on. What a kernel reads before waiting must not be written by the kernels before it: weights.
# PDL_ENABLED = False launches every kernel after it without PDL (benchmarks/profile_model.py --no-pdl: under
# PDL a profiled kernel's duration includes its wait for the one before it).
PDL_ENABLED = True


def pdl_supported(device: torch.device) -> bool:
    return PDL_ENABLED and _pdl_capable(device)


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    return (not INTERPRETED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def wait_previous_allow_next(PDL: tl.constexpr):
    """Returns once the previous kernel has finished and its writes are visible, then lets the next kernel
    in the stream launch (its programs start, and wait here in turn, as this kernel's programs finish)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# Bytes of one L2 cache line (H100): the granularity of `prefetch_to_l2`.
L2_LINE_BYTES: tl.constexpr = tl.constexpr(128)


@triton.jit
def prefetch_to_l2(ptrs):
    """Asks the memory system to bring the L2 lines holding ptrs (any shape; one address per line suffices)
    into L2, without registers and without waiting: a kernel launched with PDL prefetches its weights this
    way before `wait_previous_allow_next`, so their trip from HBM overlaps the previous kernel. A hint: the
    addresses must be valid, the data is not changed. Compiled GPUs only (the interpreter has no PTX)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)

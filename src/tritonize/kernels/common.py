"""Helpers shared by the Triton kernels: interpreter detection, and a dot and a cast that are exact there.

Must never import torch.fx, Dynamo or transformers.
"""

import functools

import torch
import triton
import triton.language as tl

# Decided once, at import: `triton.jit` returns interpreted functions when TRITON_INTERPRET=1 was set
# before the kernels were decorated, and they then run on CPU tensors (how CI tests every kernel).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

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


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (exact "ieee" unless TF32 was allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# -- programmatic dependent launch (PDL, Hopper and newer) --------------------------------------------
# A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream still runs,
# as soon as every program of that one has called `allow_next_kernel` (or exited): it can load what the
# previous kernel does not write (weights) and must call `wait_for_previous_kernel` before touching
# anything else, which returns once the previous kernel has finished and its writes are visible. Kernels
# take a `PDL: tl.constexpr` flag, `pdl_supported(device)`, since the instructions exist from sm_90 on.


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    return (not INTERPRETED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def allow_next_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


# -- prefetching into L2 (Hopper and newer) ---------------------------------------------------------
# A kernel with little memory traffic of its own (a decode step's rotary + cache write, at small batch) can
# pull the weights of the kernels after it into L2 meanwhile, so HBM never idles between weight streams.
# The host lists the 4 KB chunks to fetch (`l2_prefetch_chunks`); the kernel's extra programs each issue
# one bulk prefetch per thread (`prefetch_into_l2`) and exit: a hint, with no effect on any result.

L2_PREFETCH_CHUNK_BYTES = 4096  # the size written into prefetch_into_l2's instruction


@functools.cache
def l2_prefetch_supported(device: torch.device) -> bool:
    return pdl_supported(device)  # cp.async.bulk.prefetch exists from sm_90 on, as PDL does


def l2_prefetch_chunks(tensors, device: torch.device) -> torch.Tensor | None:
    """int64 [n] start addresses of the L2_PREFETCH_CHUNK_BYTES chunks that cover the memory of `tensors`
    (contiguous ones; others, and any smaller than a chunk, are left out), on `device`; None when there is
    nothing to fetch or the device can't (CPU, interpreter, before sm_90). The addresses are raw: the tensors
    must outlive every launch given them."""
    if not l2_prefetch_supported(device):
        return None
    chunks = []
    for t in tensors:
        n_bytes = t.numel() * t.element_size()
        if not t.is_contiguous() or n_bytes < L2_PREFETCH_CHUNK_BYTES or t.data_ptr() % 16:
            continue
        start = t.data_ptr()
        chunks.extend(range(start, start + n_bytes - L2_PREFETCH_CHUNK_BYTES + 1, L2_PREFETCH_CHUNK_BYTES))
        if n_bytes % L2_PREFETCH_CHUNK_BYTES:  # the tail, as one more chunk ending 16-byte aligned near the end
            chunks.append(start + (n_bytes - L2_PREFETCH_CHUNK_BYTES) // 16 * 16)
    return torch.tensor(chunks, dtype=torch.int64, device=device) if chunks else None


@triton.jit
def prefetch_into_l2(Chunks_ptr, n_chunks, program, BLOCK: tl.constexpr, ENABLED: tl.constexpr):
    """Program `program`'s BLOCK chunks of the list (one per element; past the end, the last one again).
    ENABLED: l2_prefetch_supported (the instruction exists); otherwise nothing."""
    if ENABLED:
        index = tl.minimum(program * BLOCK + tl.arange(0, BLOCK), n_chunks - 1)
        address = tl.load(Chunks_ptr + index)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 4096; // $0", "=r,l", [address],
                                  dtype=tl.int32, is_pure=False, pack=1)

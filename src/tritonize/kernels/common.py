"""Helpers shared by the Triton kernels: interpreter detection and a dot product that is exact there.

Must never import torch.fx, Dynamo or transformers.
"""

import torch
import triton
import triton.language as tl

# Decided once, at import: `triton.jit` returns interpreted functions when TRITON_INTERPRET=1 was set
# before the kernels were decorated, and they then run on CPU tensors (how CI tests every kernel).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot; upcasting there keeps CPU
# tests meaningful. Compiled kernels never take this branch.
_UPCAST_BF16_DOT: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tl.dot, corrected for the interpreter's bf16 bug)."""
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (exact "ieee" unless TF32 was allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"

"""Debugging tools: bounds-checked kernel runs on CPU through Triton's interpreter, and kernels compiled for
a GPU without one.

`bounds_checked()` checks every memory access of the Triton kernels launched inside it;
`check_kernel()` runs one of tritonize's kernels that way against its reference (`tritonize debug`);
`compile_for_gpu()` compiles a kernel for an architecture (sm_90 by default) to read its PTX or resources.
Must never import torch.fx, Dynamo or transformers.
"""

from tritonize.debug.bounds import BoundsCheck, OutOfBoundsError, bounds_checked
from tritonize.debug.check import KernelCheck, check_kernel
from tritonize.debug.compiled import compile_for_gpu

__all__ = ["BoundsCheck", "KernelCheck", "OutOfBoundsError", "bounds_checked", "check_kernel", "compile_for_gpu"]

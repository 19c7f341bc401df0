"""Debugging tools: bounds-checked kernel runs on CPU through Triton's interpreter.

`bounds_checked()` checks every memory access of the Triton kernels launched inside it;
`check_kernel()` runs one of tritonize's kernels that way against its reference (`tritonize debug`).
Must never import torch.fx, Dynamo or transformers.
"""

from tritonize.debug.bounds import BoundsCheck, OutOfBoundsError, bounds_checked
from tritonize.debug.check import KernelCheck, check_kernel

__all__ = ["BoundsCheck", "KernelCheck", "OutOfBoundsError", "bounds_checked", "check_kernel"]

"""Pure Triton kernels and their plain-PyTorch references (reference.py).

Each kernel module holds `@triton.jit` kernels and a host function that only picks block sizes and
launches; argument validation lives in `tritonize.ops`. Nothing here may import torch.fx, Dynamo or
transformers.
"""

"""Runs one tritonize kernel bounds-checked on random CPU inputs and compares it with its reference.

Backs `tritonize debug KERNEL --shape ...`: seeded inputs, outputs poisoned with NaN (an unwritten
element fails), relative error against the reference in fp64. Must never import torch.fx,
Dynamo or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tritonize import ops
from tritonize.debug.bounds import bounds_checked
from tritonize.kernels import reference
from tritonize.kernels.attention import flash_attention_fwd
from tritonize.kernels.common import INTERPRETED
from tritonize.kernels.linear import linear_fwd
from tritonize.kernels.norm import layer_norm_fwd, rms_norm_fwd

# kernel -> (--shape syntax, allowed numbers of dimensions)
SHAPES = {
    "attention": ("batch,heads,q_len,kv_len,head_dim[,kv_heads]", (5, 6)),
    "linear": ("M,N,K", (3,)),
    "layer_norm": ("rows,cols", (2,)),
    "rms_norm": ("rows,cols", (2,)),
}
# Relative error ||out - ref|| / ||ref|| allowed per dtype against the fp64 reference (as in tests/helpers.py).

# A case: a function that launches the kernel and returns its outputs, and one that returns the reference's.
Case = tuple[Callable[[], Sequence[torch.Tensor]], Callable[[], Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class KernelCheck:
    """One bounds-checked run: the kernels launched and the worst relative error over the outputs."""

    kernel: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    launches: tuple[str, ...]
    relative_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance  # False for NaN, i.e. an unwritten element


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / denom if denom > 0 else err


def _attention(shape: Sequence[int], dtype: torch.dtype, causal: bool) -> Case:
    batch, heads, q_len, kv_len, head_dim = shape[:5]
    kv_heads = shape[5] if len(shape) == 6 else heads
    if heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
    if not ops.MIN_HEAD_DIM <= head_dim <= ops.MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{ops.MIN_HEAD_DIM}, {ops.MAX_HEAD_DIM}], got {head_dim}")
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype) for _ in range(2))
    lengths = torch.randint(1, kv_len + 1, (batch,))  # attended keys per batch row; the first row sees all
    lengths[0] = kv_len
    mask = torch.arange(kv_len) < lengths[:, None]
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    return (
        lambda: [flash_attention_fwd(q, k, v, scale, causal, mask, out=out)],
        lambda: [reference.attention(q.double(), k.double(), v.double(), scale, causal, mask)],
    )


def _linear(shape: Sequence[int], dtype: torch.dtype) -> Case:
    M, N, K = shape
    x, weight = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / math.sqrt(K)
    bias, residual = torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    return (
        lambda: [linear_fwd(x, weight, bias, "gelu", residual, out=out)],
        lambda: [reference.linear(x.double(), weight.double(), bias.double(), "gelu", residual.double())],
    )


def _norm(shape: Sequence[int], dtype: torch.dtype, kernel_fn: Callable, reference_fn: Callable, bias: bool) -> Case:
    rows, cols = shape
    if cols > ops.MAX_NORM_HIDDEN:
        raise ValueError(f"cols must be at most {ops.MAX_NORM_HIDDEN}, got {cols}")
    x, residual = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    params = [1 + 0.1 * torch.randn(cols, dtype=dtype)] + ([torch.randn(cols, dtype=dtype)] if bias else [])
    out, residual_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    return (
        lambda: kernel_fn(x, *params, 1e-5, residual, out=out, residual_out=residual_out),
        lambda: reference_fn(x.double(), *(p.double() for p in params), 1e-5, residual.double()),
    )


def check_kernel(
    kernel: str, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, causal: bool = False, seed: int = 0
) -> KernelCheck:
    """Runs `kernel` (a key of SHAPES) on seeded random CPU inputs under bounds_checked().

    attention gets a random key padding mask (and a causal mask if asked); linear a bias, GELU and a
    residual; layer_norm / rms_norm a weight (layer_norm also a bias) and a residual, checking both
    outputs. Raises ValueError for a bad kernel, shape or dtype, OutOfBoundsError for a bad access.
    """
    if kernel not in SHAPES:
        raise ValueError(f"kernel must be one of {tuple(SHAPES)}, got {kernel!r}")
    syntax, lengths = SHAPES[kernel]
    if len(shape) not in lengths or min(shape) < 1:
        raise ValueError(f"{kernel} takes --shape {syntax} (positive integers), got {','.join(map(str, shape))}")
    if dtype not in reference.RELATIVE_TOLERANCE:
        raise ValueError(f"dtype must be one of {tuple(reference.RELATIVE_TOLERANCE)}, got {dtype}")
    if dtype == torch.bfloat16 and not INTERPRETED:
        raise ValueError(
            "bfloat16 needs TRITON_INTERPRET=1 set before tritonize is imported: Triton's interpreter gets bf16 "
            "dots and casts wrong, and the kernels correct that only when decorated for the interpreter"
        )
    if causal and kernel != "attention":
        raise ValueError("causal applies to attention only")
    torch.manual_seed(seed)
    if kernel == "attention":
        run, ref = _attention(shape, dtype, causal)
    elif kernel == "linear":
        run, ref = _linear(shape, dtype)
    elif kernel == "layer_norm":
        run, ref = _norm(shape, dtype, layer_norm_fwd, reference.layer_norm, bias=True)
    else:
        run, ref = _norm(shape, dtype, rms_norm_fwd, reference.rms_norm, bias=False)
    with bounds_checked() as record:
        outputs = run()
    error = max(_relative_error(out, gold) for out, gold in zip(outputs, ref(), strict=True))
    return KernelCheck(kernel, tuple(shape), dtype, tuple(record.launches), error, reference.RELATIVE_TOLERANCE[dtype])

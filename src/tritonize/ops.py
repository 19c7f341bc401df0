"""Public tritonize operators: validated, graph-safe entry points to the Triton kernels.

Every kernel is registered as a `torch.library.custom_op` with a fake implementation, so graphs
that call it stay valid for Dynamo, fake tensors and CUDA-graph capture. On CUDA tensors (and on CPU
tensors when TRITON_INTERPRET=1 was set before import) the Triton kernel runs; elsewhere the
plain-PyTorch reference does. Bad input raises TypeError or ValueError here, before any launch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch
import triton.testing

from tritonize import tuning
from tritonize.kernels import gemv, gemv_chain, reference
from tritonize.kernels.attention import flash_attention_fwd
from tritonize.kernels.common import INTERPRETED, card_name
from tritonize.kernels.decode_attention import decode_attention_fwd
from tritonize.kernels.gated_mlp import gated_mlp_fwd
from tritonize.kernels.linear import (
    LinearConfig,
    linear_epilogue_fwd,
    linear_fwd,
    linear_layer_norm_fwd,
    time_linear_configs,
    tuning_candidates,
)
from tritonize.kernels.norm import embedding_layer_norm_fwd, layer_norm_fwd, rms_norm_fwd
from tritonize.kernels.rotary import rotary_cache_write_fwd, rotary_fwd

__all__ = ["attention", "linear", "layer_norm", "linear_layer_norm", "embedding_layer_norm", "rms_norm", "rotary",
           "rotary_cache_write",
           "gated_mlp", "concat_gate_up", "rms_norm_linear", "rms_norm_gated_mlp", "decode_attention",
           "SUPPORTED_DTYPES"]

logger = logging.getLogger("tritonize")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_NORM_HIDDEN = 16384


def _runs_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and INTERPRETED)


# -- validation helpers: each error names the argument --------------------------------------------


def _check_tensor(name: str, t: object, *, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on device {t.device}; tritonize runs on CUDA (or CPU for testing)")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    return t


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input's dtype {dtype}")


def _check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")


# -- attention ------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    seq_major: bool,
) -> torch.Tensor:
    if not _runs_triton(q):
        out = reference.attention(q, k, v, scale, causal, key_padding_mask, bias)
        return out.transpose(1, 2).contiguous() if seq_major else out
    if not seq_major:
        return flash_attention_fwd(q, k, v, scale, causal, key_padding_mask, bias)
    batch, heads, q_len, head_dim = q.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=q.dtype, device=q.device)
    flash_attention_fwd(q, k, v, scale, causal, key_padding_mask, bias, out=out.transpose(1, 2))
    return out


@_attention_op.register_fake
def _(q, k, v, scale, causal, key_padding_mask, bias, seq_major):
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty((batch, q_len, heads, head_dim) if seq_major else q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    seq_major: bool = False,
) -> torch.Tensor:
    """Flash attention forward: softmax(q @ k^T * scale + bias, masked) @ v.

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim], any strides,
    kv_heads dividing heads (GQA/MQA). head_dim 16..256. scale (> 0) defaults to 1/sqrt(head_dim).
    causal: query i sees keys j <= i + kv_len - q_len (aligned to the end).
    key_padding_mask: bool or integer [batch, kv_len], True / nonzero = attend. bias: additive, broadcastable to
    [batch, heads, q_len, kv_len] (T5 position bias, ALiBi). A query row whose keys are all masked
    gives zeros. Returns a contiguous [batch, heads, q_len, head_dim] tensor in q's dtype, or with
    seq_major=True a contiguous [batch, q_len, heads, head_dim] one, written in that layout by the
    kernel (what transformer blocks reshape to [batch, q_len, hidden] for the output projection,
    without a transpose copy).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4)
        _check_float(name, t, q.dtype)
    _check_same_device(q.device, k=k, v=v, key_padding_mask=key_padding_mask, bias=bias)
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not fit q shape {tuple(q.shape)}: batch and head_dim must match"
        )
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, ndim=2)
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(f"key_padding_mask must be bool or integer (nonzero attends), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, kv_len):
            raise ValueError(
                f"key_padding_mask must have shape (batch, kv_len) = {(batch, kv_len)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if bias is not None:
        _check_tensor("bias", bias, ndim=range(5))
        _check_float("bias", bias)
        target = (batch, heads, q_len, kv_len)
        try:
            if torch.broadcast_shapes(bias.shape, target) != torch.Size(target):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to (batch, heads, q_len, kv_len) = {target}"
            ) from None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if not isinstance(seq_major, bool):
        raise TypeError(f"seq_major must be a bool, got {type(seq_major).__name__}")
    return _attention_op(q, k, v, float(scale), bool(causal), key_padding_mask, bias, seq_major)


# -- linear ---------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    act = None if activation == "none" else activation
    out_shape = (*x.shape[:-1], weight.shape[0])
    x2d = x.reshape(-1, x.shape[-1])
    res2d = None if residual is None else residual.reshape(-1, weight.shape[0])
    return _linear_2d(x2d, weight, bias, act, res2d).reshape(out_shape)


def _linear_2d(x2d, weight, bias, activation, residual) -> torch.Tensor:
    """ops.linear on 2-D operands, through the route the shape calls for."""
    if _runs_triton(x2d) and gemv.preferred(x2d, weight):  # decode sizes: a weight stream on CUDA cores
        return gemv.gemv_fwd(x2d, weight, bias, activation, residual)
    if _runs_triton(x2d):
        tuned = _tuned_linear_config(x2d, weight, bias, activation, residual)
        if tuned == CUBLAS:
            return _cublas_linear(x2d, weight, bias, activation, residual)
        return linear_fwd(x2d, weight, bias, activation, residual, config=tuned)
    return reference.linear(x2d, weight, bias, activation, residual)


# A linear tuning entry {"backend": "cublas"}: torch's matmul (cuBLAS) then the Triton epilogue kernel beat
# every tiled config at that shape (mid-sized prefill GEMMs on an H100, where cuBLAS's Hopper kernels win).
CUBLAS = "cublas"


def _cublas_linear(x2d, weight, bias, activation, residual) -> torch.Tensor:
    """activation(x2d @ weight^T + bias) + residual through torch's matmul (cuBLAS on CUDA): bias alone rides
    in the matmul (addmm); otherwise the product, rounded to x's dtype like torch.compile's, goes through
    `linear_epilogue_fwd` in place (bias, activation and residual in fp32, one pass)."""
    if activation is None and residual is None:
        return torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
    product = torch.mm(x2d, weight.t())
    return linear_epilogue_fwd(product, bias, activation, residual, out=product)


def _tuned_linear_config(x2d, weight, bias, activation, residual) -> LinearConfig | str | None:
    """The tuning cache's choice for this shape class (M rounded up to a power of two): a LinearConfig, or
    CUBLAS. On a miss under `tuning.autotuning()` (CUDA only, never while capturing a graph) the tiled
    candidates and the cuBLAS route are timed first and the fastest stored (or a tiled config already in use
    for another shape, when within SHARED_VARIANT_TOLERANCE of it); otherwise None: the kernel's shape
    heuristic."""
    (M, K), N = x2d.shape, weight.shape[0]
    card = card_name(x2d.device)
    epilogue = (f"{str(x2d.dtype).removeprefix('torch.')} {activation or 'none'} bias={bias is not None} "
                f"residual={residual is not None}")  # with a tiled config: what a Triton variant compiles
    key = f"M{max(16, 1 << (M - 1).bit_length())} N{N} K{K} {epilogue}"
    entry = tuning.cache().get("linear", card, key)
    if entry is not None:
        return CUBLAS if entry.get("backend") == CUBLAS else LinearConfig(**entry)
    if not (tuning.is_autotuning() and x2d.is_cuda) or torch.cuda.is_current_stream_capturing():
        return None
    in_use = _tiled_configs_in_use(card, epilogue)  # timed too: compiled already, they cost no compile
    candidates = list(dict.fromkeys([*tuning_candidates(M, N, K, x2d.dtype, x2d.device), *in_use]))
    timed = time_linear_configs(x2d, weight, bias, activation, residual, candidates)
    fastest_ms, heuristic_ms = min(ms for _, ms in timed), timed[0][1]
    best, best_ms = prefer_variants_in_use(timed, in_use)
    cublas_ms = math.inf  # fp32 stays on the exact tiled kernels (cuBLAS may run fp32 on TF32 tensor cores)
    if x2d.dtype != torch.float32:
        cublas_ms = triton.testing.do_bench_cudagraph(
            lambda: _cublas_linear(x2d, weight, bias, activation, residual), rep=10, return_mode="median")
    if cublas_ms < fastest_ms:
        best, best_ms, entry = CUBLAS, cublas_ms, {"backend": CUBLAS}
    else:
        entry = dataclasses.asdict(best)
    tuning.cache().put("linear", card, key, entry)
    logger.info("tritonize: tuned linear %s: %s %.4f ms (fastest tiled %.4f ms, shape heuristic %.4f ms, cuBLAS + "
                "epilogue %.4f ms), %d configs timed", key, best, best_ms, fastest_ms, heuristic_ms, cublas_ms,
                len(timed))
    return best


# Tuning keeps a tiled config already in use for another shape with the same epilogue over a new one that is
# at most this much faster: the two shapes then share a Triton variant (always for persistent configs; the
# pointer kernel also specializes on whether K splits evenly), and a new variant costs a bucket about a
# second of compiling on its first call (an H100 compiles a 128 x 256 tile in 1-1.5 s).
SHARED_VARIANT_TOLERANCE = 0.02


def prefer_variants_in_use(timed: Sequence[tuple[LinearConfig, float]],
                           in_use: set[LinearConfig]) -> tuple[LinearConfig, float]:
    """(config, ms): the fastest of `timed`, unless a config of `in_use` is within SHARED_VARIANT_TOLERANCE of
    it: then the fastest such one."""
    fastest_ms = min(ms for _, ms in timed)
    shared = [(config, ms) for config, ms in timed
              if config in in_use and ms <= fastest_ms * (1 + SHARED_VARIANT_TOLERANCE)]
    return min(shared or timed, key=lambda pair: pair[1])


def _tiled_configs_in_use(card: str, epilogue: str) -> set[LinearConfig]:
    """The tiled configs the tuning cache holds for this card and epilogue (dtype, activation, bias, residual)
    at any shape."""
    return {LinearConfig(**config) for key, config in tuning.cache().entries("linear", card).items()
            if key.split(" ", 3)[3:] == [epilogue] and config.get("backend") != CUBLAS}


@_linear_op.register_fake
def _(x, weight, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """activation(x @ weight^T + bias) + residual in one kernel, fp32 accumulation (or, at fp16/bf16 shapes
    where `tuning` measured it faster, cuBLAS's matmul then one Triton epilogue kernel).

    x: [..., in_features]; weight: [out_features, in_features] (nn.Linear layout); bias:
    [out_features]; residual: [..., out_features]; activation: None, "relu", "gelu" (erf),
    "gelu_tanh", "silu" or "tanh".
    """
    _check_linear_args(x, weight, bias, activation, residual)
    return _linear_op(x, weight, bias, activation or "none", residual)


def _check_linear_args(x, weight, bias, activation, residual) -> None:
    _check_tensor("x", x, ndim=range(1, 9))
    _check_float("x", x)
    _check_tensor("weight", weight, ndim=2)
    _check_float("weight", weight, x.dtype)
    _check_same_device(x.device, weight=weight, bias=bias, residual=residual)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {in_features}")
    if in_features == 0 or out_features == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        _check_float("bias", bias, x.dtype)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor("residual", residual)
        _check_float("residual", residual, x.dtype)
        expected = (*x.shape[:-1], out_features)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have the output's shape {expected}, got {tuple(residual.shape)}")
    if activation is not None and activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS} or None, got {activation!r}")


# -- norms ----------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    fn = layer_norm_fwd if _runs_triton(x) else reference.layer_norm
    return fn(x2d, weight, bias, eps)[0].reshape(x.shape)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("tritonize::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x2d, res2d = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    fn = layer_norm_fwd if _runs_triton(x) else reference.layer_norm
    y, h = fn(x2d, weight, bias, eps, res2d)
    return y.reshape(x.shape), h.reshape(x.shape)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("tritonize::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    fn = rms_norm_fwd if _runs_triton(x) else reference.rms_norm
    return fn(x2d, weight, eps, None, variant)[0].reshape(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps, variant):
    return torch.empty_like(x)


@torch.library.custom_op("tritonize::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x2d, res2d = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    fn = rms_norm_fwd if _runs_triton(x) else reference.rms_norm
    y, h = fn(x2d, weight, eps, res2d, variant)
    return y.reshape(x.shape), h.reshape(x.shape)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, variant):
    return torch.empty_like(x), torch.empty_like(x)


def _check_norm_args(x, residual, eps, **params: torch.Tensor | None) -> None:
    _check_tensor("x", x, ndim=range(1, 9))
    _check_float("x", x)
    hidden = x.shape[-1]
    if not 1 <= hidden <= MAX_NORM_HIDDEN:
        raise ValueError(f"the normalized (last) dim of x must be in [1, {MAX_NORM_HIDDEN}], got {hidden}")
    _check_same_device(x.device, residual=residual, **params)
    for name, p in params.items():
        if p is None:
            continue
        _check_tensor(name, p, ndim=1)
        _check_float(name, p)
        if p.shape[0] != hidden:
            raise ValueError(f"{name} must have shape ({hidden},) to match the normalized (last) dim, "
                             f"got {tuple(p.shape)}")
    if residual is not None:
        _check_tensor("residual", residual)
        _check_float("residual", residual, x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim, fp32 statistics.

    Without residual returns norm(x). With residual returns (norm(h), h) where h = x + residual,
    both from one pass over memory (the pre-norm residual stream and the normalized value).
    """
    _check_norm_args(x, residual, eps, weight=weight, bias=bias)
    if residual is None:
        return _layer_norm_op(x, weight, bias, float(eps))
    return _add_layer_norm_op(x, residual, weight, bias, float(eps))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    variant: str = "llama",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, fp32 mean of squares (no mean subtraction).

    variant names the model family's numerics: "llama" (normalize in fp32, round to x's dtype,
    multiply by weight), "t5" (the same arithmetic as HF's T5LayerNorm), "gemma" (multiply by
    1 + weight in fp32, then round). With residual returns (norm(h), h) where h = x + residual.
    """
    if weight is None:
        raise TypeError("weight must be a torch.Tensor, got None")
    if variant not in reference.RMS_NORM_VARIANTS:
        raise ValueError(f"variant must be one of {reference.RMS_NORM_VARIANTS}, got {variant!r}")
    _check_norm_args(x, residual, eps, weight=weight)
    if residual is None:
        return _rms_norm_op(x, weight, float(eps), variant)
    return _add_rms_norm_op(x, residual, weight, float(eps), variant)


@torch.library.custom_op("tritonize::linear_layer_norm", mutates_args=())
def _linear_layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    out_shape = (*x.shape[:-1], weight.shape[0])
    x2d, res2d = x.reshape(-1, x.shape[-1]), residual.reshape(-1, weight.shape[0])
    if not _runs_triton(x):
        h = reference.linear(x2d, weight, bias, None, res2d)
        return reference.layer_norm(h, norm_weight, norm_bias, eps)[0].reshape(out_shape)
    if gemv.preferred(x2d, weight):  # the residual in the GEMV's epilogue, then the norm
        y, _ = layer_norm_fwd(gemv.gemv_fwd(x2d, weight, bias, None, res2d), norm_weight, norm_bias, eps)
        return y.reshape(out_shape)
    tuned = _tuned_linear_config(x2d, weight, bias, None, res2d)
    if tuned == CUBLAS:
        # cuBLAS's product (bias in addmm), then the residual add inside the norm kernel: h is never stored
        product = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
        y, _ = layer_norm_fwd(product, norm_weight, norm_bias, eps, res2d, keep_sum=False)
    else:  # the residual in the linear's epilogue and the norm in its split-K reduce, or a norm kernel after
        y = linear_layer_norm_fwd(x2d, weight, bias, res2d, norm_weight, norm_bias, eps, config=tuned)
    return y.reshape(out_shape)


@_linear_layer_norm_op.register_fake
def _(x, weight, bias, residual, norm_weight, norm_bias, eps):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """layer_norm(x @ weight^T + bias + residual): a post-norm block's output projection and its norm
    (BERT), with only the normalized value returned.

    Where the tuning cache sends the product to cuBLAS, bias rides in its addmm and the residual add moves
    into the norm kernel (one pass over [M, N] instead of a separate epilogue pass, and the sum is never
    written); elsewhere the residual rides in the linear's epilogue, and where its config splits K (short
    inputs) the norm too, in the reduce kernel of the partial sums (one launch for product and norm);
    otherwise ops.layer_norm's kernel follows. Operands as in ops.linear and ops.layer_norm.
    """
    _check_linear_args(x, weight, bias, None, residual)
    _check_norm_args(residual, None, eps, norm_weight=norm_weight, norm_bias=norm_bias)
    return _linear_layer_norm_op(x, weight, bias, residual, norm_weight, norm_bias, float(eps))


@torch.library.custom_op("tritonize::embedding_layer_norm", mutates_args=())
def _embedding_layer_norm_op(
    ids: list[torch.Tensor | None],
    tables: list[torch.Tensor],
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    id_maps: list[torch.Tensor | None],
    positions_from: torch.Tensor | None,
    padding_idx: int,
    past_length: int,
) -> torch.Tensor:
    fn = embedding_layer_norm_fwd if _runs_triton(tables[0]) else reference.embedding_layer_norm
    return fn(ids, tables, norm_weight, norm_bias, eps, id_maps=id_maps, positions_from=positions_from,
              padding_idx=padding_idx, past_length=past_length)


@_embedding_layer_norm_op.register_fake
def _(ids, tables, norm_weight, norm_bias, eps, id_maps, positions_from, padding_idx, past_length):
    shape = torch.broadcast_shapes(*(i.shape for i in [*ids, positions_from] if i is not None))
    return tables[0].new_empty((*shape, tables[0].shape[1]))


def embedding_layer_norm(
    ids: Sequence[torch.Tensor | None],
    tables: Sequence[torch.Tensor],
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    id_maps: Sequence[torch.Tensor | None] | None = None,
    positions_from: torch.Tensor | None = None,
    padding_idx: int = 0,
    past_length: int = 0,
) -> torch.Tensor:
    """layer_norm(tables[0][ids[0]] + tables[1][ids[1]] (+ tables[2][ids[2]])) in one kernel: an encoder's
    embedding block (BERT: word, token-type and position embeddings, summed in that order, then LayerNorm).

    ids: 2 or 3 integer tensors of shape [batch, seq] or [seq] that broadcast together; tables: [rows, hidden]
    each, one float dtype and device, the last dim contiguous; norm_weight, norm_bias: [hidden] or None. The
    sums are rounded to the tables' dtype as eager adds store them. id_maps: None, or one entry per lookup,
    None or an integer tensor [n] or [1, n] that the ids index first: the row of tables[i] is then
    id_maps[i][ids[i]] (BERT's token types: a buffer read through the position ids). positions_from: integer
    token ids ([batch, seq] or [seq]); an ids entry None then reads each token's position counted past padding
    (RoBERTa's position ids, `reference.counted_positions`): padding_idx for a padding_idx token, else
    padding_idx + past_length + the number of tokens other than padding_idx up to and including it in its row.
    An id outside its table or map gives a row of NaN on the kernel path (eager PyTorch raises a device-side
    assert there) and an IndexError on CPU.
    """
    if not 2 <= len(ids) == len(tables) <= 3:
        raise ValueError(f"embedding_layer_norm takes 2 or 3 (ids, table) pairs, got {len(ids)} ids and "
                         f"{len(tables)} tables")
    id_maps = list(id_maps) if id_maps is not None else [None] * len(ids)
    if len(id_maps) != len(ids):
        raise ValueError(f"id_maps must have one entry per lookup ({len(ids)}), got {len(id_maps)}")
    counted = [i for i, ids_i in enumerate(ids) if ids_i is None]
    if (positions_from is None) != (not counted):
        given = "given" if positions_from is not None else "None"
        raise ValueError("an ids entry is None (counted positions) exactly when positions_from is given; got "
                         f"{len(counted)} None entries and positions_from {given}")
    if positions_from is not None:
        _check_tensor("positions_from", positions_from, ndim=(1, 2))
        if positions_from.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"positions_from must be int32 or int64, got {positions_from.dtype}")
        if past_length < 0:
            raise ValueError(f"past_length must be >= 0, got {past_length}")
        _check_same_device(tables[0].device, positions_from=positions_from)
    for i, (ids_i, table, id_map) in enumerate(zip(ids, tables, id_maps, strict=True)):
        if ids_i is not None:
            _check_tensor(f"ids[{i}]", ids_i, ndim=(1, 2))
            if ids_i.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"ids[{i}] must be int32 or int64, got {ids_i.dtype}")
            _check_same_device(tables[0].device, **{f"ids[{i}]": ids_i})
        if id_map is not None:
            _check_tensor(f"id_maps[{i}]", id_map, ndim=(1, 2))
            if id_map.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"id_maps[{i}] must be int32 or int64, got {id_map.dtype}")
            if id_map.dim() == 2 and id_map.shape[0] != 1:
                raise ValueError(f"id_maps[{i}] must be an [n] or [1, n] tensor, got shape {tuple(id_map.shape)}")
            _check_same_device(tables[0].device, **{f"id_maps[{i}]": id_map})
        _check_tensor(f"tables[{i}]", table, ndim=2)
        _check_float(f"tables[{i}]", table, tables[0].dtype)
        if table.shape[1] != tables[0].shape[1] or table.stride(1) != 1:
            raise ValueError(f"tables[{i}] must be [rows, {tables[0].shape[1]}] with contiguous rows, got shape "
                             f"{tuple(table.shape)} strides {table.stride()}")
        _check_same_device(tables[0].device, **{f"tables[{i}]": table})
    shapes = [tuple(i.shape) for i in [*ids, positions_from] if i is not None]
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError as error:
        raise ValueError(f"the ids' shapes {shapes} do not broadcast") from error
    _check_norm_args(tables[0], None, eps, norm_weight=norm_weight, norm_bias=norm_bias)  # rows as the norm's x
    return _embedding_layer_norm_op(list(ids), list(tables), norm_weight, norm_bias, float(eps), id_maps,
                                    positions_from, int(padding_idx), int(past_length))


# -- rotary embeddings ----------------------------------------------------------------------------


@torch.library.custom_op("tritonize::rotary", mutates_args=())
def _rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = rotary_fwd if _runs_triton(q) else reference.rotary
    return fn(q, k, cos, sin, interleaved)


@_rotary_op.register_fake
def _(q, k, cos, sin, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings of q and k in one kernel (fp32 math); returns new (q_rot, k_rot).

    q: [batch, heads, seq, head_dim]; k: [batch, kv_heads, seq, head_dim]; any strides (views of a packed
    qkv are fine). cos, sin: [batch or 1, seq, rotary_dim] as HF's rotary embedding returns them, rotary_dim
    even and <= head_dim; dims past rotary_dim pass through (partial rotary, GPT-NeoX / Phi).
    interleaved=False (Llama, NeoX): x * cos + rotate_half(x) * sin, cos/sin = cat(freqs, freqs).cos() /
    .sin(), i.e. each frequency in dims i and i + rotary_dim / 2. interleaved=True (GPT-J): pairs
    (x[2i], x[2i+1]) rotate by frequency i, and cos/sin hold it in dims 2i and 2i + 1 (GPT-J's
    duplicate_interleave: pass HF GPT-J's [batch, seq, rotary_dim / 2] cos.repeat_interleave(2, dim=-1)).
    Outputs are contiguous, in q's dtype.
    """
    _check_rotary_args(q, k, cos, sin, interleaved)
    return _rotary_op(q, k, cos, sin, interleaved)


def _check_rotary_args(q, k, cos, sin, interleaved) -> None:
    for name, t in (("q", q), ("k", k)):
        _check_tensor(name, t, ndim=4)
        _check_float(name, t, q.dtype)
    for name, t in (("cos", cos), ("sin", sin)):
        _check_tensor(name, t, ndim=3)
        _check_float(name, t, cos.dtype)
    _check_same_device(q.device, k=k, cos=cos, sin=sin)
    batch, _, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"k shape {tuple(k.shape)} does not fit q shape {tuple(q.shape)}: batch, seq and head_dim must match"
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rotary_dim = cos.shape[2]
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq:
        raise ValueError(f"cos/sin must have shape (batch or 1, seq, rotary_dim) with batch {batch} and seq {seq}, "
                         f"got {tuple(cos.shape)}")
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim (cos/sin's last dim) must be even and in [2, head_dim={head_dim}], "
                         f"got {rotary_dim}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")


@torch.library.custom_op("tritonize::rotary_cache_write", mutates_args=("k_cache", "v_cache", "q_out"))
def _rotary_cache_write_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_offsets: torch.Tensor,
    interleaved: bool,
    q_out: torch.Tensor | None,
) -> None:
    if _runs_triton(q):
        rotary_cache_write_fwd(q, k, v, cos, sin, k_cache, v_cache, write_offsets, interleaved, q_out)
        return
    q_rot = reference.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, write_offsets, interleaved)
    if q_out is not None:
        q_out.copy_(q_rot)


@_rotary_cache_write_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, write_offsets, interleaved, q_out):
    return None


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_offsets: torch.Tensor,
    *,
    interleaved: bool = False,
) -> torch.Tensor:
    """`rotary(q, k, cos, sin)` and the KV-cache write of k and v, in one kernel; returns the rotated q.

    q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim], any strides (views of a
    packed qkv projection are fine). cos, sin as `rotary` takes them, or both None: nothing is rotated
    (learned positions, GPT-2), k and v are only written and q is returned as given. k_cache, v_cache:
    contiguous [cache_batch >= batch, kv_heads, cache_len, head_dim] in q's dtype, written in place: token s
    of sequence b goes to position write_offsets[b] + s (decode: each sequence's current length; prefill: 0).
    write_offsets: int32 or int64 [batch] on q's device, read on the device only (no host sync: capturable in
    a CUDA graph). The caller guarantees write_offsets[b] + seq <= cache_len, which cannot be checked without
    a sync; positions outside [0, cache_len) are skipped, never written out of bounds. Returns the rotated q
    as a new contiguous tensor in q's dtype.
    """
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be tensors, or both None (no rotation)")
    if cos is None:
        _check_tensor("q", q, ndim=4)
        _check_float("q", q)
    else:
        _check_rotary_args(q, k, cos, sin, interleaved)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, ndim=4)
        _check_float(name, t, q.dtype)
    _check_tensor("write_offsets", write_offsets, ndim=1)
    _check_same_device(q.device, k=k, v=v, k_cache=k_cache, v_cache=v_cache, write_offsets=write_offsets)
    batch, _, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    if v.shape != k.shape or (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape, with q's "
                         f"{tuple(q.shape)} batch, seq and head_dim")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    cache_batch, cache_heads, cache_len, cache_head_dim = k_cache.shape
    if cache_batch < batch or cache_heads != kv_heads or cache_head_dim != head_dim or cache_len < seq:
        raise ValueError(f"k_cache/v_cache of shape {tuple(k_cache.shape)} cannot hold k of shape {tuple(k.shape)}: "
                         "need (>= batch, kv_heads, >= seq, head_dim)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if write_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"write_offsets must be an int32 or int64 tensor, got {write_offsets.dtype}")
    if write_offsets.shape[0] != batch:
        raise ValueError(f"write_offsets must have shape (batch,) = ({batch},), got {tuple(write_offsets.shape)}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    q_out = None if cos is None else torch.empty_like(q, memory_format=torch.contiguous_format)
    _rotary_cache_write_op(q, k, v, cos, sin, k_cache, v_cache, write_offsets, interleaved, q_out)
    return q if q_out is None else q_out


# -- gated MLP ------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::gated_mlp", mutates_args=())
def _gated_mlp_op(
    x: torch.Tensor, gate_up_weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    intermediate = gate_up_weight.shape[0] // 2
    x2d = x.reshape(-1, x.shape[-1])
    if _runs_triton(x) and gemv.preferred(x2d, gate_up_weight):
        out = gemv.gemv_fwd(x2d, gate_up_weight, bias, activation, None, gated=True)
    else:
        out = (gated_mlp_fwd if _runs_triton(x) else reference.gated_mlp)(x2d, gate_up_weight, bias, activation)
    return out.reshape(*x.shape[:-1], intermediate)


@_gated_mlp_op.register_fake
def _(x, gate_up_weight, bias, activation):
    return x.new_empty((*x.shape[:-1], gate_up_weight.shape[0] // 2))


def concat_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """cat([gate, up], dim=0): the gate_up_weight (or bias) of gated_mlp from the separate projections.

    gate, up: nn.Linear weights [intermediate, hidden] (or biases [intermediate]) of the same shape and dtype.
    """
    _check_tensor("gate", gate, ndim=(1, 2))
    _check_tensor("up", up, ndim=(1, 2))
    _check_float("gate", gate)
    _check_float("up", up, gate.dtype)
    _check_same_device(gate.device, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return torch.cat([gate, up], dim=0)


def gated_mlp(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    *,
    activation: str = "silu",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up) in one kernel, fp32 accumulation.

    x: [..., hidden]; gate_up_weight: [2 * intermediate, hidden] = cat([W_gate, W_up], dim=0), the gate
    projection's rows first (concat_gate_up builds it); bias: [2 * intermediate] = cat([b_gate, b_up]).
    activation: "silu" (SwiGLU), "gelu" (GeGLU, erf) or "gelu_tanh". Returns [..., intermediate] in x's dtype.
    """
    _check_gated_mlp_args(x, gate_up_weight, bias, activation)
    return _gated_mlp_op(x, gate_up_weight, bias, activation)


def _check_gated_mlp_args(x, gate_up_weight, bias, activation) -> None:
    _check_tensor("x", x, ndim=range(1, 9))
    _check_float("x", x)
    _check_tensor("gate_up_weight", gate_up_weight, ndim=2)
    _check_float("gate_up_weight", gate_up_weight, x.dtype)
    _check_same_device(x.device, gate_up_weight=gate_up_weight, bias=bias)
    rows, hidden = gate_up_weight.shape
    if rows == 0 or hidden == 0 or rows % 2:
        raise ValueError(
            f"gate_up_weight must be [2 * intermediate, hidden], non-empty, got {tuple(gate_up_weight.shape)}"
        )
    if x.shape[-1] != hidden:
        raise ValueError(
            f"x has {x.shape[-1]} features but gate_up_weight {tuple(gate_up_weight.shape)} expects {hidden}"
        )
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        _check_float("bias", bias, x.dtype)
        if bias.shape[0] != rows:
            raise ValueError(f"bias must have shape ({rows},) = (2 * intermediate,), got {tuple(bias.shape)}")
    if activation not in reference.GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.GATED_ACTIVATIONS}, got {activation!r}")


# -- RMSNorm fused into the next projection -----------------------------------------------------------


@torch.library.custom_op("tritonize::rms_norm_linear", mutates_args=())
def _rms_norm_linear_op(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    if _runs_triton(x) and gemv.preferred(x2d, weight):  # one kernel: the norm in the weight stream's prologue
        out = gemv.gemv_fwd(x2d, weight, bias, None, None, rms_norm_weight=norm_weight, rms_norm_eps=eps)
    else:
        out = _linear_op(_rms_norm_op(x2d, norm_weight, eps, "llama"), weight, bias, "none", None)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_rms_norm_linear_op.register_fake
def _(x, norm_weight, eps, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tritonize::rms_norm_gated_mlp", mutates_args=())
def _rms_norm_gated_mlp_op(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
    bias: torch.Tensor | None, activation: str,
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    if _runs_triton(x) and gemv.preferred(x2d, gate_up_weight):
        out = gemv.gemv_fwd(x2d, gate_up_weight, bias, activation, None, gated=True, rms_norm_weight=norm_weight,
                            rms_norm_eps=eps)
    else:
        out = _gated_mlp_op(_rms_norm_op(x2d, norm_weight, eps, "llama"), gate_up_weight, bias, activation)
    return out.reshape(*x.shape[:-1], gate_up_weight.shape[0] // 2)


@_rms_norm_gated_mlp_op.register_fake
def _(x, norm_weight, eps, gate_up_weight, bias, activation):
    return x.new_empty((*x.shape[:-1], gate_up_weight.shape[0] // 2))


def rms_norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """linear(rms_norm(x, norm_weight, eps), weight, bias): a pre-norm projection (Llama's q/k/v, lm_head).

    RMSNorm with the "llama" variant's numerics. At decode sizes (a few rows) one kernel, the norm computed in
    the projection's prologue; otherwise the two kernels of `rms_norm` and `linear`, with the same result.
    """
    _check_norm_args(x, None, eps, norm_weight=norm_weight)
    _check_linear_args(x, weight, bias, None, None)
    return _rms_norm_linear_op(x, norm_weight, float(eps), weight, bias)


def rms_norm_gated_mlp(
    x: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, *, eps: float = 1e-6,
    activation: str = "silu", bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """gated_mlp(rms_norm(x, norm_weight, eps), gate_up_weight, activation=, bias=): Llama's pre-norm MLP
    input half, one kernel at decode sizes (see rms_norm_linear)."""
    _check_norm_args(x, None, eps, norm_weight=norm_weight)
    _check_gated_mlp_args(x, gate_up_weight, bias, activation)
    return _rms_norm_gated_mlp_op(x, norm_weight, float(eps), gate_up_weight, bias, activation)


# devices whose driver refused the chain's cooperative launch (e.g. its grid not resident at once): the four ops
_CHAIN_LAUNCH_REFUSED: set[torch.device] = set()


@torch.library.custom_op("tritonize::decoder_layer_chain", mutates_args=("counter",))
def _decoder_layer_chain_op(
    attn: torch.Tensor, h: torch.Tensor, o_weight: torch.Tensor, o_bias: torch.Tensor | None,
    mlp_norm_weight: torch.Tensor, mlp_eps: float, gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None,
    down_weight: torch.Tensor, down_bias: torch.Tensor | None, next_norm_weight: torch.Tensor, next_eps: float,
    next_weight: torch.Tensor, next_bias: torch.Tensor | None, activation: str, counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = gemv_chain.ChainWeights(o_weight, o_bias, mlp_norm_weight, mlp_eps, gate_up_weight, gate_up_bias,
                                      down_weight, down_bias, next_norm_weight, next_eps, next_weight, next_bias)
    # last: each weight where the unchained ops would stream it through the GEMV too (gemv.MAX_WEIGHT_BYTES)
    if (_runs_triton(attn) and attn.device not in _CHAIN_LAUNCH_REFUSED and gemv_chain.supports(attn, weights)
            and h.is_contiguous()
            and all(gemv.preferred(h, w) for w in (o_weight, gate_up_weight, down_weight, next_weight))):
        try:
            return gemv_chain.layer_chain_fwd(attn, h, weights, activation, counter)
        except RuntimeError as error:  # Triton's launcher reports a refused launch as "Triton Error [CUDA]: ..."
            capturing = attn.is_cuda and torch.cuda.is_current_stream_capturing()  # a graph it left broken
            if not str(error).startswith("Triton Error [CUDA]") or capturing:
                raise
            _CHAIN_LAUNCH_REFUSED.add(attn.device)
            logger.warning("tritonize: the GPU refused the decode layer chain's cooperative launch on %s (%s); its "
                           "layers run as four kernels from now on", attn.device, error)
    h_mid = _linear_op(attn, o_weight, o_bias, "none", h)
    act = _rms_norm_gated_mlp_op(h_mid, mlp_norm_weight, mlp_eps, gate_up_weight, gate_up_bias, activation)
    h_out = _linear_op(act, down_weight, down_bias, "none", h_mid)
    return h_out, _rms_norm_linear_op(h_out, next_norm_weight, next_eps, next_weight, next_bias)


@_decoder_layer_chain_op.register_fake
def _(attn, h, o_weight, o_bias, mlp_norm_weight, mlp_eps, gate_up_weight, gate_up_bias, down_weight, down_bias,
      next_norm_weight, next_eps, next_weight, next_bias, activation, counter):  # fmt: skip
    return torch.empty_like(h), h.new_empty((h.shape[0], next_weight.shape[0]))


def decoder_layer_chain(
    attn: torch.Tensor, h: torch.Tensor, *, o_weight: torch.Tensor, o_bias: torch.Tensor | None,
    mlp_norm_weight: torch.Tensor, mlp_eps: float, gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor | None,
    down_weight: torch.Tensor, down_bias: torch.Tensor | None, next_norm_weight: torch.Tensor, next_eps: float,
    next_weight: torch.Tensor, next_bias: torch.Tensor | None, activation: str, counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama-style decoder layer after attention, and the next pre-norm projection, for a few rows:

        h_mid = attn @ o_weight^T + o_bias + h
        h_out = gated_mlp(rms_norm(h_mid, mlp_norm_weight, mlp_eps), gate_up_weight, activation) @ down^T
                + down_bias + h_mid
        next = rms_norm(h_out, next_norm_weight, next_eps) @ next_weight^T + next_bias

    returning (h_out, next); next is the next layer's QKV projection, or the logits with the final norm and
    lm_head. attn: [M, attention width], h: [M, hidden], 2-D and contiguous. At most `gemv.GEMV_MAX_M` rows on
    CUDA: one persistent kernel (kernels/gemv_chain.py) whose phases are joined by grid barriers, with the same
    numerics as the four fused ops it replaces (`linear` with residual, `rms_norm_gated_mlp`, `linear` with
    residual, `rms_norm_linear`), which run instead elsewhere, and where a weight is too large for the GEMV on
    this card (`gemv.preferred`: on an H200, an lm_head above 64 MB), and on a device whose driver refused the
    kernel's cooperative launch (logged once). counter: an int32 [1] tensor holding 0, owned by the caller, used
    by one stream at a time (the kernel counts in it and leaves it 0).
    """
    _check_linear_args(attn, o_weight, o_bias, None, h)
    _check_norm_args(h, None, mlp_eps, norm_weight=mlp_norm_weight)
    _check_gated_mlp_args(h, gate_up_weight, gate_up_bias, activation)
    _check_linear_args(h.new_empty(1, gate_up_weight.shape[0] // 2), down_weight, down_bias, None, None)
    _check_norm_args(h, None, next_eps, norm_weight=next_norm_weight)
    _check_linear_args(h, next_weight, next_bias, None, None)
    if attn.dim() != 2 or h.dim() != 2:
        raise ValueError(f"decoder_layer_chain takes 2-D attn and h, got {tuple(attn.shape)} and {tuple(h.shape)}")
    if counter.dtype != torch.int32 or counter.numel() != 1 or counter.device != attn.device:
        raise ValueError(f"counter must be one int32 on {attn.device}, got {counter.dtype} {tuple(counter.shape)} "
                         f"on {counter.device}")
    return _decoder_layer_chain_op(attn, h, o_weight, o_bias, mlp_norm_weight, float(mlp_eps), gate_up_weight,
                                   gate_up_bias, down_weight, down_bias, next_norm_weight, float(next_eps),
                                   next_weight, next_bias, activation, counter)


# -- decode attention -----------------------------------------------------------------------------

MAX_DECODE_QUERIES = 16


@torch.library.custom_op("tritonize::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None,
) -> torch.Tensor:
    if _runs_triton(q):
        return decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, key_start)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, key_start)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, key_start):
    return q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of 1 to 16 new tokens per sequence against a preallocated KV cache (flash-decoding).

    q: [batch, heads, q_len, head_dim]; k_cache, v_cache: [batch, kv_heads, max_len, head_dim], any
    strides, kv_heads dividing heads (GQA/MQA); head_dim 16..256. cache_seqlens: int32 [batch] on q's
    device, the valid positions of each sequence including the q_len new tokens already written, so
    query i sits at position seqlen - q_len + i and sees keys up to it. key_start: optional int32
    [batch], each sequence's first valid key (left padding). The lengths are read on the device only
    (no host sync: one CUDA graph serves every step); a length above max_len is the caller's bug and
    is clamped to max_len. Query rows with no valid key give zeros. Returns [batch, heads, q_len,
    head_dim] in q's dtype.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, ndim=4)
        _check_float(name, t, q.dtype)
    batch, heads, q_len, head_dim = q.shape
    for name, t in (("cache_seqlens", cache_seqlens), ("key_start", key_start)):
        if t is None:
            continue
        _check_tensor(name, t, ndim=1)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
        if t.shape[0] != batch:
            raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    _check_same_device(q.device, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, key_start=key_start)
    if not 1 <= q_len <= MAX_DECODE_QUERIES:
        raise ValueError(f"q must hold 1 to {MAX_DECODE_QUERIES} query tokens (dim 2), got {q_len}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache/v_cache shape {tuple(k_cache.shape)} does not fit q shape {tuple(q.shape)}: "
            "batch and head_dim must match"
        )
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if max_len < q_len:
        raise ValueError(f"k_cache holds {max_len} positions, fewer than the q_len ({q_len}) new tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, float(scale), key_start)

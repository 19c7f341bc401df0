"""Runs HF transformers (>= 5) attention on `tritonize.ops.attention` through AttentionInterface.

Registers a "tritonize" attention function and a key-padding mask builder (AttentionMaskInterface),
switches models to them, and falls back to HF's own attention per call, with the reason in the
report, for what the kernel cannot take. Reaches kernels only through `tritonize.ops`; must never
import triton, torch.fx or Dynamo itself.
"""

from __future__ import annotations

import inspect
import re
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

from tritonize import ops
from tritonize.reporting import Report

__all__ = ["ATTN_NAME", "register", "use_tritonize_attention", "set_attention_implementation"]

ATTN_NAME = "tritonize"

# A module's forward that picks its attention function from the config (not a hard-coded "sdpa").
_INTERFACE_CALL = re.compile(r"ALL_ATTENTION_FUNCTIONS(?:\.get_interface\(|\[(?![\"']))")

# Each module of a switched model -> the report its fallbacks go to. Weak keys: the entry dies with
# the module, and nothing is added to the model (a Report holds a lock, which deepcopy and pickle refuse).
_REPORTS: weakref.WeakKeyDictionary[torch.nn.Module, Report] = weakref.WeakKeyDictionary()


# -- the mask builder -----------------------------------------------------------------------------


def tritonize_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask `tritonize_attention` takes: bool [batch, kv_length] (True = attend) or None.

    Plain causal or bidirectional masks become the key-padding mask alone (causality is the attention
    module's `is_causal`, aligned to the end, which is right when the queries are the last q_length
    keys); None when no attention_mask was given. Anything else (sliding window, chunks, packed
    sequences, or/and mask functions, a static cache's offsets) becomes HF's dense 4-D bool mask.
    Never reads tensor values on the host, so it is safe inside CUDA-graph capture.
    """
    if mask_function is bidirectional_mask_function:
        # `config.is_causal = False` turns a decoder bidirectional, but its modules keep is_causal = True
        plain = getattr(kwargs.get("config"), "is_causal", True)
        end_aligned = True
    else:
        plain = mask_function is causal_mask_function
        end_aligned = (
            isinstance(q_offset, (int, torch.SymInt))
            and isinstance(kv_offset, (int, torch.SymInt))
            and q_offset + q_length == kv_offset + kv_length
        )
    if plain and end_aligned:
        if attention_mask is None:
            return None
        padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return padding_mask[:, kv_offset : kv_offset + kv_length]
    # Never let sdpa_mask skip to None: its skips read the mask on the host and assume sdpa's
    # upper-left causal alignment.
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


# -- the attention function -----------------------------------------------------------------------


def _eager_only(kwargs: dict[str, Any]) -> str | None:
    """A feature that only the model's own eager function has (sdpa drops or refuses it), or None."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True needs the attention weights"
    if kwargs.get("softcap") is not None:
        return "softcap (logit soft-capping)"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks (s_aux)"
    return None


def _unsupported(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    dropout: float,
    position_bias: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> str | None:
    """Why this call cannot run on `ops.attention`, or None when it can."""
    if (feature := _eager_only(kwargs)) is not None:
        return feature
    if module.training and dropout > 0:
        return "attention dropout in training mode"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "needs gradients (the kernel is forward only)"
    if query.dtype not in ops.SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes q {query.dtype}, k {key.dtype}, v {value.dtype} (needs one of fp16, bf16, fp32)"
    if query.device.type not in ("cuda", "cpu"):
        return f"device {query.device}"
    head_dim = query.shape[-1]
    if not ops.MIN_HEAD_DIM <= head_dim <= ops.MAX_HEAD_DIM:
        return f"head_dim {head_dim} outside [{ops.MIN_HEAD_DIM}, {ops.MAX_HEAD_DIM}]"
    if key.shape != value.shape or key.shape[-1] != head_dim or key.shape[0] != query.shape[0]:
        return f"q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)} (needs one head_dim and batch)"
    if query.shape[1] % key.shape[1] != 0:
        return f"kv heads {key.shape[1]} do not divide heads {query.shape[1]}"
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
            return f"attention mask of type {type(attention_mask).__name__}, not a 2-D or 4-D tensor"
        if attention_mask.dim() == 2 and attention_mask.dtype != torch.bool:
            return f"2-D attention mask of dtype {attention_mask.dtype} (needs bool)"
    if position_bias is not None and position_bias.dtype not in ops.SUPPORTED_DTYPES:
        return f"position_bias dtype {position_bias.dtype}"
    return None


def _additive(mask: torch.Tensor, dtype: torch.dtype, fill: float) -> torch.Tensor:
    """A 4-D mask as an additive float mask: bool True -> 0, False -> fill; float masks as they are."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, fill)


def _dense_mask(attention_mask: object, causal: bool, q_len: int, kv_len: int, device: torch.device) -> object:
    """Our key-padding (+ end-aligned causal) mask as the 4-D bool mask HF's own functions take.

    Any other mask (4-D, or something we did not build) is HF's already and is returned as it is.
    """
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool
    ):
        return attention_mask
    padding = None if attention_mask is None else attention_mask[:, None, None, :]
    if not causal or q_len == 1:
        return padding
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    return allowed if padding is None else allowed & padding


def _fall_back(
    reason: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    dropout: float,
    scaling: float | None,
    causal: bool,
    position_bias: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs this call with HF's sdpa attention, or the model's own eager one for features sdpa lacks."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    use_eager = eager is not None and _eager_only(kwargs) is not None
    report = _REPORTS.get(module)
    if report is not None:
        report.fall_back(type(module).__name__, f"{reason}: ran HF {'eager' if use_eager else 'sdpa'} attention")
    mask = _dense_mask(attention_mask, causal, query.shape[2], key.shape[2], query.device)
    if not use_eager:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=False,
            position_bias=position_bias,
            **kwargs,
        )
    # Eager functions add a float mask; not all of them know position_bias, so it is folded in here.
    if isinstance(mask, torch.Tensor):
        mask = _additive(mask, query.dtype, torch.finfo(query.dtype).min)
    if position_bias is not None:
        mask = position_bias if mask is None else mask + position_bias
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def tritonize_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention function: q [B, H, Lq, D], k/v [B, KVH, Lk, D] -> ([B, Lq, H, D] contiguous, None).

    attention_mask: None, bool [B, Lk] from `tritonize_mask` (key padding; the causal flag comes
    from `is_causal` or the module), or a 4-D bool/float mask that becomes an additive bias and
    already holds causality (as in HF's sdpa function). position_bias (T5) is added to the scores.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = _unsupported(module, query, key, value, attention_mask, dropout, position_bias, kwargs)
    if reason is not None:
        return _fall_back(
            reason, module, query, key, value, attention_mask, dropout, scaling, causal, position_bias, kwargs
        )
    key_padding_mask = bias = None
    if attention_mask is not None and attention_mask.dim() == 4:
        bias = _additive(attention_mask, query.dtype, float("-inf"))
        causal = False
    else:
        key_padding_mask = attention_mask
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    out = ops.attention(query, key, value, scale=scaling, causal=causal, key_padding_mask=key_padding_mask,
                        bias=bias, seq_major=True)
    return out, None


# -- switching models -----------------------------------------------------------------------------


def register() -> None:
    """Registers "tritonize" in HF's AttentionInterface and AttentionMaskInterface (idempotent)."""
    if AttentionInterface._global_mapping.get(ATTN_NAME) is not tritonize_attention:
        AttentionInterface.register(ATTN_NAME, tritonize_attention)
    if AttentionMaskInterface._global_mapping.get(ATTN_NAME) is not tritonize_mask:
        AttentionMaskInterface.register(ATTN_NAME, tritonize_mask)


def _calls_attention_interface(cls: type, seen: dict[type, bool]) -> bool:
    if cls not in seen:
        try:
            seen[cls] = _INTERFACE_CALL.search(inspect.getsource(cls.forward)) is not None
        except (AttributeError, OSError, TypeError):
            seen[cls] = False
    return seen[cls]


def use_tritonize_attention(model: torch.nn.Module, report: Report) -> str | None:
    """Switches an HF model (and its sub-models) to "tritonize" attention; returns the previous name.

    Records ("attention", n) in the report, n being the modules whose forward picks its attention
    function from the config and whose config now names "tritonize" (found once, at switch time,
    from the classes' source, the way HF itself decides whether a model can switch). Later per-call
    fallbacks go to the same report. Returns None, with the reason in the report, when the model
    does not route attention through AttentionInterface.
    """
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        report.fall_back(name, "not a transformers PreTrainedModel (no AttentionInterface)")
        return None
    if not model._can_set_attn_implementation():
        report.fall_back(name, "its attention does not go through transformers' AttentionInterface")
        return None
    register()
    previous = model.config._attn_implementation
    set_attention_implementation(model, ATTN_NAME)
    seen: dict[type, bool] = {}
    count = sum(
        _calls_attention_interface(type(m), seen)
        and getattr(getattr(m, "config", None), "_attn_implementation", None) == ATTN_NAME
        for m in model.modules()
    )
    if count == 0:
        set_attention_implementation(model, previous)
        report.fall_back(name, "no module picks its attention from transformers' AttentionInterface")
        return None
    for module in model.modules():
        _REPORTS[module] = report
    report.record("attention", count)
    return previous


def set_attention_implementation(model: PreTrainedModel, name: str) -> None:
    """Sets `name` ("eager", "sdpa", the value `use_tritonize_attention` returned...) on model and sub-models.

    transformers 5.17 leaves out sub-models holding a copy of the config rather than a sub-config of it (T5's
    encoder and decoder stacks), so those are set one by one; 5.25 reaches them in the first call.
    """
    model.set_attn_implementation(name)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != name:
            module.set_attn_implementation(name)

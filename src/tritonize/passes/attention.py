"""Attention -> `tritonize.ops.attention` (flash attention), from SDPA calls and from the written-out form.

`sdpa` matches `F.scaled_dot_product_attention` (no dropout; a bool mask becomes a key-padding mask or
an additive bias, a float mask a bias); `attention` matches `softmax(q @ k^T [* s | / d] [+ mask]) @ v`
with the scale read from the graph (1 when there is none); `key_padding_mask_cast` lets the kernel read
an integer padding mask itself instead of after a conversion to bool. passes/ never imports triton.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tritonize import ops
from tritonize.ops import MAX_HEAD_DIM, MIN_HEAD_DIM
from tritonize.passes.registry import (
    ADD,
    DIV,
    MUL,
    Reject,
    arg,
    check,
    check_tensor,
    equal,
    erase_unused,
    fake,
    is_call,
    is_cast,
    is_number,
    operands,
    register_pattern,
    replace,
    same_shape,
    sole_user,
    static_int,
)

_MATMUL = (operator.matmul, torch.matmul, "matmul")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gqa: bool) -> None:
    """Reject unless ops.attention takes q [B, H, L, D], k and v [B, Hkv, S, D] (fake tensors)."""
    check(q.dim() == k.dim() == v.dim() == 4, "q, k, v are not 4-D [batch, heads, seq, head_dim]")
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device, "q, k, v are on different devices")
    check(same_shape(k, v), f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    head_dim = static_int(q.shape[-1])
    check(head_dim is not None and equal(k.shape[-1], head_dim), "head_dim of q and k differ")
    check(MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM, f"head_dim {head_dim} is outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    check(equal(q.shape[0], k.shape[0]), "q and k differ in batch size")
    heads, kv_heads = static_int(q.shape[1]), static_int(k.shape[1])
    check(heads is not None and kv_heads is not None, "the number of heads is dynamic")
    grouped = kv_heads == 1 or (gqa and heads % kv_heads == 0)
    check(kv_heads == heads or grouped, f"{heads} query heads on {kv_heads} kv heads")


def _broadcasts(mask: torch.Tensor, target: tuple) -> bool:
    """mask's shape broadcasts to target (4-D) without growing it."""
    pairs = zip(reversed(mask.shape), reversed(target), strict=False)
    return mask.dim() <= 4 and all(equal(m, 1) or equal(m, t) for m, t in pairs)


def _record_fake(node: fx.Node) -> None:
    """Record the fake tensor (shape, dtype, device) of `node = target(source, ...)`, computed from its
    inputs' fake tensors: for a call a pattern made, or one whose source a pattern changed."""
    inputs = fx.node.map_arg(node.args, lambda n: n.meta.get("example_value", n.meta.get("val")))
    with fake(node.args[0]).fake_mode:
        node.meta["example_value"] = node.target(*inputs)


def _shared(graph: fx.Graph, source: fx.Node, target, args: tuple) -> fx.Node:
    """The node computing target(*args) right after source; reused when an earlier rewrite made it."""
    for user in source.users:
        if user.op == "call_function" and user.target is target and user.args == args:
            return user
    with graph.inserting_after(source):
        made = graph.call_function(target, args)
    _record_fake(made)
    return made


def _mask_kwargs(mask: object, scores: tuple) -> dict:
    """ops.attention keyword arguments for an SDPA attn_mask: bool [B, 1, 1, S] -> key_padding_mask;
    other bool masks -> a 0 / -inf bias; float masks -> bias. scores is (B, H, L, S)."""
    if mask is None:
        return {}
    value = fake(mask)
    check(value is not None and value.device.type in ("cuda", "cpu"), "attn_mask is not a tensor on CUDA or CPU")
    check(_broadcasts(value, scores), f"attn_mask of shape {tuple(value.shape)} does not broadcast to {scores}")
    if value.dtype != torch.bool:
        check_tensor("attn_mask", mask)
        return {"bias": mask}
    padding = value.dim() == 4 and all(equal(value.shape[i], 1) for i in (1, 2))
    if padding and all(equal(value.shape[i], scores[i]) for i in (0, 3)):
        index = (slice(None), 0, 0, slice(None))
        return {"key_padding_mask": _shared(mask.graph, mask, operator.getitem, (mask, index))}
    return {"bias": _shared(mask.graph, mask, torch.where, (mask, 0.0, float("-inf")))}


@register_pattern("attention")
def sdpa(node: fx.Node) -> bool:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa) -> ops.attention."""
    if not is_call(node, F.scaled_dot_product_attention):
        return False
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    q_value, k_value, v_value = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    check(arg(node, 4, "dropout_p", 0.0) == 0, "dropout_p is not 0")
    _check_qkv(q_value, k_value, v_value, gqa=arg(node, 7, "enable_gqa", False) is True)
    causal, scale = arg(node, 5, "is_causal", False), arg(node, 6, "scale")
    check(isinstance(causal, bool), "is_causal is not known when compiling")
    # SDPA aligns its causal mask to the top left, ops.attention to the bottom right: same when L == S.
    check(not causal or equal(q_value.shape[2], k_value.shape[2]), "causal with q_len != kv_len")
    check(scale is None or (is_number(scale) and scale > 0), f"scale {scale!r} is not a number > 0")
    scores = (*q_value.shape[:3], k_value.shape[2])
    mask_kwargs = _mask_kwargs(arg(node, 3, "attn_mask"), scores)
    try:
        replace(node, ops.attention, q, k, v, scale=scale, causal=causal, **mask_kwargs)
    except Reject:
        for made in mask_kwargs.values():  # a mask conversion made for this call and now unused
            erase_unused(made)
        raise
    return True


def _scaled_scores(node: object) -> tuple[fx.Node, float] | None:
    """(q @ kt node, scale) when node is q @ kt, (q @ kt) * s, s * (q @ kt) or (q @ kt) / d."""
    if is_call(node, *_MATMUL):
        return node, 1.0
    if (pair := operands(node, MUL)) is not None:
        product, scale = pair if isinstance(pair[0], fx.Node) else pair[::-1]
    elif (pair := operands(node, DIV)) is not None and is_number(pair[1]) and pair[1] != 0:
        product, scale = pair[0], 1.0 / pair[1]
    else:
        return None
    return (product, float(scale)) if is_call(product, *_MATMUL) and is_number(scale) else None


def _untransposed(kt: fx.Node) -> fx.Node:
    """k when kt is k with its last two dims swapped; otherwise a new `kt.transpose(-2, -1)` node."""
    dims = (arg(kt, 1, "dim0"), arg(kt, 2, "dim1"))
    if is_call(kt, torch.transpose, "transpose") and all(isinstance(d, int) for d in dims):
        if {d % 4 for d in dims} == {2, 3}:
            return kt.args[0]
    with kt.graph.inserting_after(kt):
        return kt.graph.call_method("transpose", (kt, -2, -1))


@register_pattern("attention")
def attention(node: fx.Node) -> bool:
    """softmax(q @ k.transpose(-2, -1) [* scale | / d] [+ mask], dim=-1) [.to(dtype)] @ v -> ops.attention."""
    if not is_call(node, F.softmax, torch.softmax, "softmax"):
        return False
    logits, mask = arg(node, 0, "input"), None
    found = _scaled_scores(logits)
    if found is None and (pair := operands(logits, ADD)) is not None:
        for scores, other in (pair, pair[::-1]):
            if found is None and (found := _scaled_scores(scores)) is not None:
                mask = other
    if found is None or not (fake(logits) is not None and arg(node, 1, "dim") in (-1, fake(logits).dim() - 1)):
        return False
    product, scale = found
    if not isinstance(product.args[0], fx.Node) or not isinstance(product.args[1], fx.Node):
        return False
    q, kt = product.args
    q_value, kt_value = check_tensor("q", q), check_tensor("k", kt)
    probs = sole_user(node) if is_cast(sole_user(node)) else node
    out = sole_user(probs)
    check(is_call(out, *_MATMUL) and out.args[0] is probs, "the attention probabilities are used other than by @ v")
    v = out.args[1]
    v_value = check_tensor("v", v)
    check(kt_value.dim() == 4, "k is not 4-D")
    _check_qkv(q_value, kt_value.transpose(-2, -1), v_value, gqa=False)
    check(fake(out).dtype == q_value.dtype, f"the output dtype {fake(out).dtype} is not q's {q_value.dtype}")
    check(scale > 0, f"scale {scale} is not > 0")
    scores = tuple(fake(product).shape)
    if mask is not None:
        mask_value = check_tensor("mask", mask)
        check(same_shape(fake(logits), fake(product)), f"mask {tuple(mask_value.shape)} grows the scores")
        check(_broadcasts(mask_value, scores), f"mask of shape {tuple(mask_value.shape)} does not fit {scores}")
    bias = {} if mask is None else {"bias": mask}
    k = _untransposed(kt)
    try:
        replace(out, ops.attention, q, k, v, scale=scale, **bias)
    except Reject:
        erase_unused(k)  # a transpose made for this call and now unused
        raise
    return True


# what a graph holds where ops.attention was traced (HF's attention interface calls it inside the model)
_ATTENTION_OP = torch.ops.tritonize.attention.default


def _only_key_padding(mask: fx.Node) -> bool:
    """Every reader of mask takes it as an attention's key_padding_mask, directly or through indexing."""

    def reads_only_as_key_padding(user: fx.Node) -> bool:
        if is_call(user, ops.attention):
            others = [*user.args, *(v for k, v in user.kwargs.items() if k != "key_padding_mask")]
            return user.kwargs.get("key_padding_mask") is mask and mask not in others
        if user.op == "call_function" and user.target is _ATTENTION_OP:
            key_padding_position = 5  # _attention_op(q, k, v, scale, causal, key_padding_mask, bias, seq_major)
            others = [a for i, a in enumerate(user.args) if i != key_padding_position]
            return len(user.args) > key_padding_position and user.args[key_padding_position] is mask \
                and mask not in others and not user.kwargs
        if is_call(user, operator.getitem) and user.args[0] is mask and mask not in user.args[1:]:
            return _only_key_padding(user)
        return False

    return bool(mask.users) and all(reads_only_as_key_padding(user) for user in mask.users)


def _refresh_indexings(node: fx.Node) -> None:
    """Record again the fake tensors of the indexings of node (and of theirs) after node's dtype changed."""
    for user in node.users:
        if is_call(user, operator.getitem) and user.args[0] is node:
            _record_fake(user)
            _refresh_indexings(user)


@register_pattern(None, stage="lower")
def key_padding_mask_cast(node: fx.Node) -> bool:
    """`mask.to(torch.bool)` of an integer mask read only as attention key-padding masks -> mask: the kernel
    tests `!= 0` itself, which is what the conversion does, so the call saves a conversion kernel (HF's
    mask builders make that conversion of the user's int64 attention_mask; it is inside a graph only for a model
    compiled whole)."""
    if not is_cast(node):
        return False
    out, source = fake(node), node.args[0]
    source_value = fake(source)
    integer = not (source_value.dtype.is_floating_point or source_value.dtype.is_complex)
    if out.dtype != torch.bool or source_value.dtype == torch.bool or not integer or not _only_key_padding(node):
        return False
    node.replace_all_uses_with(source)
    node.graph.erase_node(node)
    _refresh_indexings(source)
    return True

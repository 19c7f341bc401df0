"""LayerNorm and RMSNorm -> `tritonize.ops.layer_norm` / `ops.rms_norm`, with a residual add fused in.

`embedding_layer_norm` first takes a LayerNorm of summed embedding lookups (BERT's embeddings) whole.
`layer_norm` matches `F.layer_norm(x, (hidden,), w, b, eps)`; `rms_norm` matches the written-out forms
of HF's RMSNorms by their numerics (Llama/T5: round, then multiply by the weight; Gemma: multiply by
1 + weight in fp32, then round). When the normalized tensor is `a + b`, the add moves into the kernel
and its other users read the kernel's second output. `linear_layer_norm` then joins a linear with a
residual add to the LayerNorm that alone reads it. eps always comes from the graph. passes/ never imports triton.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tritonize import ops
from tritonize.ops import MAX_NORM_HIDDEN
from tritonize.passes.registry import (
    ADD,
    MUL,
    Reject,
    arg,
    check,
    check_tensor,
    equal,
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


def _split_residual(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x = a + b with a, b and x all of one shape and dtype (no broadcast), else None."""
    pair = operands(x, ADD)
    if pair is None or not all(fake(v) is not None for v in pair):
        return None
    x_value = fake(x)
    if all(same_shape(fake(v), x_value) and fake(v).dtype == x_value.dtype for v in pair):
        return pair
    return None


def _check_norm(x: fx.Node, eps: object, **params: fx.Node | None) -> torch.Tensor:
    """x's fake tensor, after checking the norm kernels take x, eps and the 1-D parameters."""
    x_value = check_tensor("x", x)
    hidden = static_int(x_value.shape[-1]) if x_value.dim() else None
    check(hidden is not None and 1 <= hidden <= MAX_NORM_HIDDEN, f"hidden size must be 1..{MAX_NORM_HIDDEN}")
    check(x_value.dim() <= 8, f"x has {x_value.dim()} dims; the norm kernels take 1 to 8")
    check(is_number(eps) and eps >= 0, f"eps {eps!r} is not a number >= 0 known when compiling")
    for name, p in params.items():
        if p is not None:
            value = check_tensor(name, p)
            check(tuple(value.shape) == (hidden,), f"{name} has shape {tuple(value.shape)}, not ({hidden},)")
            check(value.device == x_value.device, f"{name} is on {value.device}, x on {x_value.device}")
    return x_value


def _replace_norm(end: fx.Node, x: fx.Node, norm, *args, **kwargs) -> None:
    """(end, x) -> norm(a, *args, residual=b) when x = a + b and that can move; else end -> norm(x, *args)."""
    pair = _split_residual(x)
    if pair is not None:
        try:
            replace((end, x), norm, pair[0], *args, residual=pair[1], **kwargs)
            return
        except Reject:
            pass
    replace(end, norm, x, *args, **kwargs)


def _layer_norm_operands(node: fx.Node) -> tuple[torch.Tensor, object, object, object]:
    """(x's fake tensor, weight, bias, eps) of an F.layer_norm call, after checking the norm kernels take it
    and it normalizes the last dim alone."""
    x, shape = arg(node, 0, "input"), arg(node, 1, "normalized_shape")
    weight, bias, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)
    x_value = _check_norm(x, eps, weight=weight, bias=bias)
    last_dim_only = isinstance(shape, (list, tuple)) and list(shape) == [x_value.shape[-1]]
    check(last_dim_only, f"normalized_shape {shape} is not the last dim alone")
    return x_value, weight, bias, eps


def _embedding_lookups(x: object) -> list[tuple[fx.Node, fx.Node]] | None:
    """[(ids, table), ...] in summation order when x = F.embedding(ids0, t0) + F.embedding(ids1, t1) (+ ...),
    each lookup and partial sum read only by the next add and no lookup renormalizing its table (max_norm);
    else None."""
    if is_call(x, F.embedding):
        plain = arg(x, 3, "max_norm") is None
        return [(arg(x, 0, "input"), arg(x, 1, "weight"))] if plain else None
    pair = operands(x, ADD)
    if pair is None or not all(isinstance(v, fx.Node) and sole_user(v) is x for v in pair):
        return None
    first, second = _embedding_lookups(pair[0]), _embedding_lookups(pair[1])
    return None if first is None or second is None else first + second


def _read_through_map(ids: object) -> tuple[fx.Node, fx.Node] | None:
    """(index, id_map) when ids = torch.gather(id_map[.expand(n, -1)], 1, index)[.expand(...)] with id_map an
    integer [1, n] tensor, so ids[b, s] = id_map[0, index[b, s]] (BERT's token types: a zero buffer read
    through the position ids); else None."""
    gathered = ids.args[0] if is_call(ids, "expand") else ids
    if not is_call(gathered, torch.gather, "gather") or arg(gathered, 1, "dim") not in (1, -1):
        return None
    source, index = arg(gathered, 0, "input"), arg(gathered, 2, "index")
    id_map = source.args[0] if is_call(source, "expand") else source
    map_value, index_value = fake(id_map), fake(index)
    if map_value is None or index_value is None or arg(gathered, 3, "sparse_grad", False):
        return None
    integer = map_value.dtype in (torch.int32, torch.int64) and index_value.dtype in (torch.int32, torch.int64)
    one_row = map_value.dim() == 2 and static_int(map_value.shape[0]) == 1 and index_value.dim() == 2
    return (index, id_map) if integer and one_row else None


def _uncast(node: object) -> object:
    """The input of node when node is a pure dtype conversion (`is_cast`), else node."""
    return node.args[0] if is_cast(node) else node


def _int_operand(pair: tuple[object, object] | None) -> tuple[object, int] | None:
    """(the other operand, the int) when one of a binary op's operands is a Python int, else None."""
    if pair is None:
        return None
    for other, number in (pair, pair[::-1]):
        if isinstance(number, int) and not isinstance(number, bool):
            return other, number
    return None


def _counted_positions(ids: object) -> tuple[fx.Node, int, int] | None:
    """(token_ids, padding_idx, past_length) when ids = (cumsum(mask, -1) + past_length) * mask + padding_idx
    with mask = token_ids != padding_idx, up to a dtype cast at each step (HF RoBERTa's
    create_position_ids_from_input_ids: each token numbered past the padding), so the kernel can count them
    itself; else None."""
    shifted = _int_operand(operands(ids, ADD))
    product = operands(_uncast(shifted[0]), MUL) if shifted is not None else None
    if product is None:
        return None
    padding_idx = shifted[1]
    for running, mask in (product, product[::-1]):
        compared = _uncast(mask)
        if not is_call(compared, "ne", torch.ne, operator.ne) or arg(compared, 1, "other") != padding_idx:
            continue
        token_ids, past = arg(compared, 0, "input"), _int_operand(operands(_uncast(running), ADD))
        running, past_length = (_uncast(past[0]), past[1]) if past is not None else (_uncast(running), 0)
        token_value, ids_value = fake(token_ids), fake(ids)
        if (not is_call(running, torch.cumsum, "cumsum") or _uncast(arg(running, 0, "input")) is not compared
                or token_value is None or ids_value is None or past_length < 0):
            continue
        along_seq = arg(running, 1, "dim") in (-1, token_value.dim() - 1)
        if (along_seq and token_value.dtype in (torch.int32, torch.int64) and token_value.dim() in (1, 2)
                and same_shape(token_value, ids_value)):
            return token_ids, padding_idx, past_length
    return None


def _broadcast_kept(old: torch.Tensor, new: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Reading ids `new` instead of `old` leaves the shape all the lookups' ids broadcast to unchanged: each dim
    of old is new's or another lookup's."""
    shapes = [new.shape, *(o.shape for o in others)]
    return new.dim() <= old.dim() and all(
        any(len(shape) >= k and equal(shape[-k], old.shape[-k]) for shape in shapes) for k in range(1, old.dim() + 1)
    )


@register_pattern("embedding_layer_norm")
def embedding_layer_norm(node: fx.Node) -> bool:
    """F.layer_norm(F.embedding(ids0, t0) + F.embedding(ids1, t1) (+ F.embedding(ids2, t2))) over the last dim
    (BERT's embeddings: words, token types, positions) -> ops.embedding_layer_norm: the gathers, the sums and
    the norm in one kernel; ids gathered from a one-row buffer (BERT's default token types) are read through it
    by the kernel too, and positions numbered past the padding (RoBERTa's) are counted by it. Registered before
    `layer_norm`, which would otherwise take the last add."""
    if not is_call(node, F.layer_norm):
        return False
    lookups = _embedding_lookups(arg(node, 0, "input"))
    if lookups is None or len(lookups) < 2:
        return False
    x_value, weight, bias, eps = _layer_norm_operands(node)
    check(len(lookups) <= 3, f"{len(lookups)} embeddings are summed; the kernel takes 2 or 3")
    ids, id_maps, counted = [], [], None
    for i, (ids_i, table) in enumerate(lookups):
        ids_value, table_value = fake(ids_i), check_tensor(f"tables[{i}]", table)
        check(isinstance(ids_value, torch.Tensor) and ids_value.dtype in (torch.int32, torch.int64)
              and ids_value.dim() in (1, 2) and ids_value.device == x_value.device,
              f"ids[{i}] is not an int32/int64 [batch, seq] or [seq] tensor on x's device")
        check(table_value.dim() == 2 and table_value.dtype == x_value.dtype, f"table {i} is not 2-D in x's dtype")
        check(table_value.device == x_value.device, f"table {i} is on {table_value.device}, x on {x_value.device}")
        through_map = _read_through_map(ids_i)
        # the ids as the op reads them: a counted lookup reads positions of the token ids' shape
        others = [fake(counted[0] if other is None else other) for other in ids] + [
            fake(later) for later, _ in lookups[i + 1:]]
        if (through_map is not None and fake(through_map[1]).device == x_value.device
                and _broadcast_kept(ids_value, fake(through_map[0]), others)):
            ids_i, id_map = through_map
        else:
            id_map = None
        positions = _counted_positions(ids_i)
        if positions is not None and counted in (None, positions) and fake(positions[0]).device == x_value.device:
            ids_i, counted = None, positions  # one source of counted positions per call
        ids.append(ids_i)
        id_maps.append(id_map)
    maps = {"id_maps": id_maps} if any(m is not None for m in id_maps) else {}
    if counted is not None:
        maps.update(positions_from=counted[0], padding_idx=counted[1], past_length=counted[2])
    replace(node, ops.embedding_layer_norm, ids, [table for _, table in lookups], weight, bias, eps, **maps)
    return True


@register_pattern("layer_norm")
def layer_norm(node: fx.Node) -> bool:
    """F.layer_norm over the last dim -> ops.layer_norm (residual fused when its input is a sum)."""
    if not is_call(node, F.layer_norm):
        return False
    _, weight, bias, eps = _layer_norm_operands(node)
    _replace_norm(node, arg(node, 0, "input"), ops.layer_norm, weight, bias, eps)
    return True


@register_pattern("linear_layer_norm")
def linear_layer_norm(node: fx.Node) -> bool:
    """ops.layer_norm(ops.linear(x, w, b, residual=r)), the norm the linear's only reader (post-norm blocks:
    BERT's output projections) -> ops.linear_layer_norm, which may move the residual add into the norm."""
    if not is_call(node, ops.layer_norm) or node.kwargs.get("residual") is not None:
        return False
    linear = node.args[0]
    if not is_call(linear, ops.linear) or sole_user(linear) is not node:
        return False
    residual = linear.kwargs.get("residual")
    if residual is None or linear.kwargs.get("activation") is not None:
        return False
    replace(node, ops.linear_layer_norm, *linear.args, residual, *node.args[1:])
    return True


def _mean_square_plus_eps(node: object) -> tuple[fx.Node, object] | None:
    """(s, eps) when node computes mean(s ** 2, dim=-1, keepdim=True) + eps, else None."""
    pair = operands(node, ADD)
    if pair is None:
        return None
    mean, eps = pair if isinstance(pair[0], fx.Node) else pair[::-1]
    if not is_call(mean, torch.mean, "mean") or arg(mean, 2, "keepdim") is not True:
        return None
    square = arg(mean, 0, "input")
    if fake(square) is None or arg(mean, 1, "dim") not in (-1, [-1], (-1,), fake(square).dim() - 1):
        return None
    squares = is_call(square, torch.pow, "pow") and arg(square, 1, "exponent") == 2
    if squares or is_call(square, torch.square, "square"):
        return square.args[0], eps
    pair = operands(square, MUL)
    return (pair[0], eps) if pair is not None and pair[0] is pair[1] else None


def _one_plus(node: object) -> fx.Node | None:
    """w when node computes 1 + w (w possibly cast), else None."""
    pair = operands(node, ADD)
    ones = [is_number(v) and v == 1 for v in pair or ()]
    if not any(ones):
        return None
    other = pair[1] if ones[0] else pair[0]
    return _uncast(other) if isinstance(other, fx.Node) else None


@register_pattern("rms_norm")
def rms_norm(node: fx.Node) -> bool:
    """x * rsqrt(mean(x_fp32 ** 2, -1, keepdim=True) + eps), then the weight: Llama/T5 `w * n.to(dtype)`
    (variant "llama") or Gemma `(n * (1 + w)).to(dtype)` (variant "gemma") -> ops.rms_norm."""
    if not is_call(node, torch.rsqrt, "rsqrt"):
        return False
    stats = _mean_square_plus_eps(arg(node, 0, "input"))
    normed = sole_user(node)
    pair = operands(normed, MUL)
    if stats is None or pair is None:
        return False
    squared, eps = stats
    x, scaled_input = _uncast(squared), pair[1] if pair[0] is node else pair[0]
    if scaled_input is not x and not (_uncast(scaled_input) is x and fake(scaled_input).dtype == torch.float32):
        return False
    x_value, squared_value = check_tensor("x", x), fake(squared)
    check(squared_value is not None and squared_value.dtype == torch.float32, "the mean of squares is not in float32")
    # -- the weight: after rounding to x's dtype (llama), or as 1 + w in fp32 before it (gemma) --
    rounded, scaled = None, sole_user(normed)
    if is_cast(scaled):
        rounded, scaled = scaled, sole_user(scaled)
    pair = operands(scaled, MUL)
    check(pair is not None, "the normalized value is not multiplied by a weight")
    factor = pair[1] if pair[0] is (normed if rounded is None else rounded) else pair[0]
    weight = _one_plus(factor)
    if weight is not None and rounded is None:
        variant = "gemma"
        check(fake(factor).dtype == torch.float32, "1 + weight is not computed in float32 (not Gemma's numerics)")
    else:
        variant, weight = "llama", factor
        exact = fake(rounded).dtype == x_value.dtype if rounded is not None else x_value.dtype == torch.float32
        check(exact, "the weight multiplies a value not rounded to x's dtype (neither Llama's nor Gemma's numerics)")
    end = scaled
    if is_cast(sole_user(end)) and fake(sole_user(end)).dtype == x_value.dtype:
        end = sole_user(end)
    check(fake(end).dtype == x_value.dtype, f"the output dtype {fake(end).dtype} is not x's dtype {x_value.dtype}")
    _check_norm(x, eps, weight=weight)
    _replace_norm(end, x, ops.rms_norm, weight, eps, variant=variant)
    return True

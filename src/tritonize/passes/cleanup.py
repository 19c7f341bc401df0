"""Clean-up patterns that make an inference graph regular before the fusions look at it.

Removes dropout that does nothing (eval mode or p == 0) and turns an in-place add whose target
nobody else sees into a plain add, so `linear -> dropout -> += residual` reads as a fusable chain.
passes/ never imports triton.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tritonize.passes.registry import arg, check, fake, is_call, register_pattern

_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)


@register_pattern(None, stage="cleanup")
def dropout(node: fx.Node) -> bool:
    """`F.dropout(x, p, training=False)` or with p == 0 -> x."""
    if is_call(node, torch.dropout):
        p, training = arg(node, 1, "p"), arg(node, 2, "train")
    elif is_call(node, *_DROPOUTS):
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    else:
        return False
    check(p == 0 or training is False, "dropout is active (training=True): put the model in eval mode")
    node.replace_all_uses_with(arg(node, 0, "input"))
    node.graph.erase_node(node)
    return True


@register_pattern(None, stage="cleanup")
def inplace_add(node: fx.Node) -> bool:
    """`x += y` / `x.add_(y)` -> `x + y` when x is a fresh tensor (not a view, not an input) used by
    nothing else and the sum keeps x's dtype; otherwise the in-place add is left as it is."""
    if not is_call(node, operator.iadd, "add_") or len(node.args) != 2 or node.kwargs:
        return False
    x, other = node.args
    x_value, other_value = fake(x), fake(other)
    fresh = x_value is not None and x.op in ("call_function", "call_method") and not x_value._is_view()
    if not (fresh and len(x.users) == 1) or (other_value is not None and other_value.dtype != x_value.dtype):
        return False
    with node.graph.inserting_before(node):
        add = node.graph.call_function(operator.add, (x, other))
    add.meta.update(node.meta)
    node.replace_all_uses_with(add)
    node.graph.erase_node(node)
    return True

"""Sibling linears (attention's query, key and value projections) -> one wider linear.

Two steps. `pack_sibling_linears(module)` (optimize_model calls it before tracing) moves the weights
of the nn.Linear children of one parent that share in_features, dtype and device into one
contiguous storage, one after the other (and their biases likewise): the Parameters stay the same
objects with the same values, only their memory moves, so nothing is copied per call and no memory
is added. Then the fx pattern `sibling_linears` sees, in the graph, linears that read the same input
with weights lying back to back in one storage, and computes them as one linear over the whole
block (an `as_strided` view, no copy), handing each former output a `narrow` view. One wide GEMM
fills the GPU where three narrow ones left SMs idle (BERT's 768 x 768 projections at 1024 tokens).

Caveat (as for any CUDA-graph runtime): replacing a parameter's storage after optimize_model
(`param.data = other`) is not seen by the CUDA graphs, nor without them before torch 2.13 (whose Dynamo
guards retrace then; 2.11's do not); `load_state_dict` copies in place and is fine.
passes/ never imports triton.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from tritonize.passes.linear import fusable_activation, fusable_residual
from tritonize.passes.registry import arg, fake, is_call, register_pattern, sole_user


def pack_sibling_linears(module: torch.nn.Module) -> int:
    """Packs, for every parent in `module`, its nn.Linear children of equal in_features, dtype, device
    and bias presence into one storage (registration order). Returns how many groups were packed.
    Tied or non-contiguous weights are left where they are."""
    counts: dict[int, int] = defaultdict(int)
    for _, parameter in module.named_parameters(remove_duplicate=False):
        counts[id(parameter)] += 1
    packed = 0
    for parent in module.modules():
        groups: dict[tuple, list[torch.nn.Linear]] = defaultdict(list)
        for child in parent.children():
            if isinstance(child, torch.nn.Linear) and child.weight.is_contiguous() and counts[id(child.weight)] == 1:
                w = child.weight
                groups[(w.shape[1], w.dtype, w.device, child.bias is not None)].append(child)
        for linears in groups.values():
            if len(linears) >= 2:
                pack_parameters([lin.weight for lin in linears])
                if linears[0].bias is not None:
                    pack_parameters([lin.bias for lin in linears])
                packed += 1
    return packed


def pack_parameters(parameters: Sequence[torch.nn.Parameter], conv1d: bool = False) -> torch.Tensor:
    """cat(parameters, dim=0) as nn.Linear weights [out, in] (or biases), and the parameters become views
    of it (same objects, same values, one storage). conv1d: HF Conv1D weights [in, out] (GPT-2), which
    become transposed views. Returns the concatenation."""
    as_linear = [p.detach().t() if conv1d and p.dim() == 2 else p.detach() for p in parameters]
    packed = torch.cat(as_linear, dim=0)
    for parameter, block in zip(parameters, packed.split([part.shape[0] for part in as_linear]), strict=True):
        parameter.data = block.t() if conv1d and parameter.dim() == 2 else block
    return packed


def _siblings(node: fx.Node) -> list[fx.Node]:
    """The F.linear calls reading node's input whose weights share node's weight storage (node's own
    included), in storage order, none of whose result flows into an activation or residual add that
    the linear pattern would fuse instead."""
    x, storage = arg(node, 0, "input"), _storage(arg(node, 1, "weight"))
    found = [u for u in x.users if is_call(u, F.linear) and arg(u, 0, "input") is x
             and storage is not None and _storage(arg(u, 1, "weight")) == storage and not _feeds_epilogue(u)]
    return sorted(found, key=lambda u: fake(arg(u, 1, "weight")).storage_offset())


def _storage(weight: object) -> int | None:
    value = fake(weight)
    return value.untyped_storage()._cdata if value is not None else None


def _feeds_epilogue(linear: fx.Node) -> bool:
    user = sole_user(linear)
    return user is not None and (fusable_activation(user) is not None or fusable_residual(user, linear) is not None)


def _back_to_back(values: list[torch.Tensor]) -> bool:
    """Contiguous tensors of one storage, each starting where the previous one ends, equal trailing dims."""
    first = values[0]
    storage = first.untyped_storage()._cdata
    offset = first.storage_offset()
    for value in values:
        same = value.untyped_storage()._cdata == storage and value.shape[1:] == first.shape[1:]
        if not (same and value.is_contiguous() and value.storage_offset() == offset and value.dtype == first.dtype):
            return False
        offset += value.numel()
    return True


@register_pattern("linear_merge", stage="cleanup")
def sibling_linears(node: fx.Node) -> bool:
    """linear(x, W1, b1), linear(x, W2, b2), ... with W1, W2, ... back to back in memory (as
    pack_sibling_linears leaves them) -> linear(x, [W1; W2; ...], [b1; b2; ...]) and narrow views."""
    if not is_call(node, F.linear):
        return False
    siblings = _siblings(node)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if len(siblings) < 2 or min(siblings, key=order.__getitem__) is not node:
        return False
    weights = [arg(s, 1, "weight") for s in siblings]
    biases = [arg(s, 2, "bias") for s in siblings]
    weight_values = [fake(w) for w in weights]
    if any(v is None or v.dim() != 2 for v in weight_values) or not _back_to_back(weight_values):
        return False
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        return False
    bias_values = [fake(b) for b in biases] if has_bias else []
    if has_bias and (any(v is None or v.dim() != 1 for v in bias_values) or not _back_to_back(bias_values)):
        return False

    graph, x = node.graph, arg(node, 0, "input")
    rows = [v.shape[0] for v in weight_values]
    total, in_features = sum(rows), weight_values[0].shape[1]
    fake_mode = weight_values[0].fake_mode

    def add(target, args, method=False):
        new = graph.call_method(target, args) if method else graph.call_function(target, args)
        with fake_mode:
            values = [fake(a) if isinstance(a, fx.Node) else a for a in args]
            new.meta["example_value"] = getattr(values[0], target)(*values[1:]) if method else target(*values)
        new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        return new

    with graph.inserting_before(node):
        weight = add(torch.as_strided, (weights[0], (total, in_features), (in_features, 1),
                                        weight_values[0].storage_offset()))
        bias = add(torch.as_strided, (biases[0], (total,), (1,), bias_values[0].storage_offset())) if has_bias else None
        merged = add(F.linear, (x, weight, bias))
        start = 0
        for sibling, width in zip(siblings, rows, strict=True):
            view = add("narrow", (merged, -1, start, width), method=True)
            sibling.replace_all_uses_with(view)
            start += width
    for sibling in siblings:
        graph.erase_node(sibling)
    return True

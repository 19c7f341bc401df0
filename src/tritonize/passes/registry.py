"""The pattern registry: how tritonize rewrites a TorchDynamo graph, and the public way to teach it a model.

A pattern is a function `rewrite(node) -> bool` registered with `@register_pattern(kind)`. It looks at
one fx node and its neighbours, replaces the sub-graph it recognises by a `tritonize.ops` call and
returns True; returns False when the node is not its pattern; raises `Reject(reason)` when it is, but
a kernel cannot take it (the reason goes to the report). passes/ never imports triton.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

from tritonize.ops import SUPPORTED_DTYPES
from tritonize.reporting import Report

__all__ = [
    "ADD", "DEFAULT_REGISTRY", "DIV", "MUL", "STAGES", "Pattern", "Registry", "Reject", "arg", "check",
    "check_tensor", "describe", "equal", "erase_unused", "fake", "is_call", "is_cast", "is_number", "operands",
    "register_pattern", "replace", "run_passes", "same_shape", "sole_user", "static_int",
]

# Patterns run stage by stage, in registration order within a stage: "cleanup" makes the graph
# regular (no eval-mode dropout, no in-place adds), "fuse" replaces multi-node patterns, and "lower"
# replaces the single ops that no fusion took (so a user's "fuse" pattern still sees them).
STAGES = ("cleanup", "fuse", "lower")

# Targets of the binary ops patterns look for: functions, and method names (call_method nodes).
ADD = (operator.add, torch.add, "add")
MUL = (operator.mul, torch.mul, "mul")
DIV = (operator.truediv, torch.div, "div")

Rewrite = Callable[[fx.Node], bool]
Target = Callable[..., Any] | str


class Reject(Exception):
    """Raised by a pattern for a node it recognises but cannot replace; the message is the reason."""


@dataclass(frozen=True)
class Pattern:
    """A registered rewrite: `kind` is what the report counts ("linear", ...; None counts nothing)."""

    name: str
    kind: str | None
    stage: str
    rewrite: Rewrite


class Registry:
    """An ordered set of patterns. tritonize's own live in DEFAULT_REGISTRY, which is where
    `register_pattern` adds yours; a separate Registry lets a test or tool run its own set."""

    def __init__(self) -> None:
        self._patterns: dict[str, Pattern] = {}

    def register(
        self, kind: str | None, *, name: str | None = None, stage: str = "fuse"
    ) -> Callable[[Rewrite], Rewrite]:
        """Decorator: add `rewrite` under `name` (default: the function's name). Registering a name
        again replaces that pattern in place (re-running a notebook cell is harmless)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

        def decorate(rewrite: Rewrite) -> Rewrite:
            pattern_name = name or rewrite.__name__
            self._patterns[pattern_name] = Pattern(pattern_name, kind, stage, rewrite)
            return rewrite

        return decorate

    def unregister(self, name: str) -> None:
        """Remove the pattern called `name` (KeyError if there is none)."""
        del self._patterns[name]

    def patterns(self) -> list[Pattern]:
        """The patterns in the order they run."""
        return sorted(self._patterns.values(), key=lambda p: STAGES.index(p.stage))

    def names(self) -> list[str]:
        return [p.name for p in self.patterns()]

    def check_names(self, names: Collection[str]) -> None:
        """Raise ValueError if any of names is not a registered pattern (a typo in `skip`)."""
        unknown = set(names) - set(self._patterns)
        if unknown:
            raise ValueError(f"unknown patterns {sorted(unknown)}; known: {self.names()}")


DEFAULT_REGISTRY = Registry()


def register_pattern(kind: str | None, *, name: str | None = None, stage: str = "fuse") -> Callable[[Rewrite], Rewrite]:
    """Decorator adding a pattern to the default registry, which `tritonize_backend` runs.

    kind: what the report counts when the pattern replaces something ("linear", "attention", ...),
    None for clean-ups. stage: "cleanup", "fuse" (default) or "lower"; see STAGES.
    """
    return DEFAULT_REGISTRY.register(kind, name=name, stage=stage)


def run_passes(
    gm: fx.GraphModule, report: Report, *, registry: Registry | None = None, skip: Collection[str] = ()
) -> None:
    """Run every pattern of `registry` (default: DEFAULT_REGISTRY) but those named in `skip` over
    `gm` in place, recording replacements and fallbacks in `report`, then recompile `gm`."""
    registry = registry or DEFAULT_REGISTRY
    registry.check_names(skip)
    rejected: dict[fx.Node, str] = {}  # a reason already reported for a node is not repeated by later patterns
    for pattern in registry.patterns():
        if pattern.name not in skip:
            _run_pattern(pattern, gm.graph, report, rejected)
    gm.graph.lint()
    gm.recompile()


def _run_pattern(pattern: Pattern, graph: fx.Graph, report: Report, rejected: dict[fx.Node, str]) -> None:
    alive = set(graph.nodes)
    for node in list(graph.nodes):
        if node not in alive or node.op not in ("call_function", "call_method"):
            continue
        try:
            replaced = pattern.rewrite(node)
        except Reject as reason:
            if rejected.get(node) != str(reason):
                rejected[node] = str(reason)
                report.fall_back(describe(node), f"{reason} [{pattern.name}]")
            continue
        if replaced:
            if pattern.kind is not None:
                report.record(pattern.kind)
            alive = set(graph.nodes)


def describe(node: fx.Node) -> str:
    """`node.name (module path)`, e.g. "scaled_dot_product_attention (encoder.layer.0.attention.self)"."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = re.sub(r"^L\['[^']*'\]\.?", "", list(stack.values())[-1][0]) or "top level"
    return f"{node.name} ({path})"


# -- matching helpers -----------------------------------------------------------------------------


def is_call(node: object, *targets: Target) -> bool:
    """True when node calls one of targets: a function (call_function) or a method name (call_method)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is t for t in targets if not isinstance(t, str))
    return node.op == "call_method" and node.target in targets


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, given by keyword or at position `index` (self counts as 0 for methods)."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def fake(value: object) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node (shape, dtype, device, no data), or None."""
    if not isinstance(value, fx.Node):
        return None
    meta = value.meta.get("example_value", value.meta.get("val"))
    return meta if isinstance(meta, torch.Tensor) else None


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses node's value, or None if there are several or none."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def operands(node: object, targets: Sequence[Target]) -> tuple[Any, Any] | None:
    """(a, b) when node computes `a op b` with one of targets (e.g. ADD, MUL), without alpha/rounding."""
    if not is_call(node, *targets) or set(node.kwargs) - {"other"}:
        return None
    values = (*node.args, *node.kwargs.values())
    return values if len(values) == 2 else None


def is_cast(node: object) -> bool:
    """True for a pure dtype conversion (x.to(dtype), .float(), .half(), .int(), .long(), .type_as(y), ...): same
    shape and device in and out, so a pattern may look through it."""
    if not is_call(node, "to", "float", "double", "half", "bfloat16", "int", "long", "bool", "type", "type_as"):
        return False
    out, src = fake(node), fake(node.args[0])
    return out is not None and src is not None and same_shape(out, src) and out.device == src.device


def check(condition: bool, reason: str) -> None:
    """Raise Reject(reason) unless condition holds."""
    if not condition:
        raise Reject(reason)


def check_tensor(name: str, value: object) -> torch.Tensor:
    """The fake tensor of `value`, after checking that tritonize's kernels take it: a CUDA (or CPU)
    tensor of dtype float16, bfloat16 or float32. Raises Reject naming `name` otherwise."""
    tensor = fake(value)
    check(tensor is not None, f"{name} is not a tensor with known metadata")
    check(tensor.device.type in ("cuda", "cpu"), f"{name} is on {tensor.device}; kernels run on CUDA (or CPU)")
    check(tensor.dtype in SUPPORTED_DTYPES, f"{name} has dtype {tensor.dtype}; kernels take float16, bfloat16, float32")
    return tensor


def equal(a: object, b: object) -> bool:
    """Two sizes are equal. Symbolic sizes (dimensions Dynamo made dynamic) compare by the values
    seen while compiling and add a guard, so an input that breaks the equality recompiles the graph."""
    return guard_or_false(a == b)


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two tensors have equal shapes (see `equal` for symbolic sizes)."""
    return a.dim() == b.dim() and all(equal(x, y) for x, y in zip(a.shape, b.shape, strict=True))


def static_int(size: object) -> int | None:
    """A size as a Python int, or None when it is symbolic (a dimension Dynamo made dynamic)."""
    return size if isinstance(size, int) else None


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- rewriting helpers ----------------------------------------------------------------------------

_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def replace(old: fx.Node | Sequence[fx.Node], target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
    """Insert `target(*args, **kwargs)` and let it take the place of `old`; erase what became unused.

    `old` is one node, or a sequence of nodes when target returns a tuple (one node per output, in
    order). The call is inserted right after the latest of its inputs; every user of an old node is
    rewired to it. Raises Reject, before touching the graph, if a user of `old` would then precede it
    or an in-place op runs between that point and `old` (moving the computation could change it).
    Returns the new call node.
    """
    olds = [old] if isinstance(old, fx.Node) else list(old)
    graph = olds[0].graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    inputs: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), inputs.append)
    anchor = max(inputs, key=position.__getitem__)
    for o in olds:
        early = [u.name for u in o.users if position[u] <= position[anchor]]
        check(not early, f"{o.name} is used by {early} before the replacement's inputs are ready")
    last = max(position[o] for o in olds)
    mutations = [n.name for n in position if position[anchor] < position[n] < last and _mutates(n)]
    check(not mutations, f"in-place ops {mutations} run between the inputs and the output")
    with graph.inserting_after(anchor):
        new = graph.call_function(target, args, kwargs)
    new.meta.update({k: olds[0].meta[k] for k in ("nn_module_stack", "stack_trace") if k in olds[0].meta})
    if isinstance(old, fx.Node):
        new.meta["example_value"] = fake(old)
        outputs = [new]
    else:
        new.meta["example_value"] = tuple(fake(o) for o in olds)
        outputs = []
        for i, o in enumerate(olds):
            with graph.inserting_after(outputs[-1] if outputs else new):
                outputs.append(graph.call_function(operator.getitem, (new, i)))
            outputs[-1].meta.update(new.meta, example_value=fake(o))
    for o, out in zip(olds, outputs, strict=True):
        o.replace_all_uses_with(out)
    for o in olds:
        erase_unused(o)
    return new


def erase_unused(node: fx.Node) -> None:
    """Erase node if nothing uses it, then each of its inputs that became unused, and so on upwards.
    Placeholders, outputs, in-place (mutating) and other impure calls (runtime assertions) are never erased."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method") or _mutates(n) or n.is_impure():
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


# Dynamo's runtime checks of symbolic sizes (torch 2.11 puts `_assert_scalar`s of an unbacked slice length
# into HF BERT's embeddings): impure, so never erased, but they write no tensor, so computations may move
# across them.
_RUNTIME_ASSERTIONS = (
    torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.default, torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range.default, torch.ops.aten.sym_constrain_range_for_size.default,
)


def _mutates(node: fx.Node) -> bool:
    """True for a call that may write to a tensor (in-place method or operator, inplace=True, impure other than a
    runtime assertion)."""
    if node.op not in ("call_function", "call_method") or node.target in _RUNTIME_ASSERTIONS:
        return False
    if node.kwargs.get("inplace") or node.is_impure():
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    return any(node.target is f for f in _INPLACE_FUNCTIONS)

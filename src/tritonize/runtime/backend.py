"""The TorchDynamo backend: runs tritonize's fx passes over each captured graph and returns it to run.

Inference only: graphs captured while gradients are needed are returned untouched (the report says
so). Must never import triton; kernels enter the graph only as `tritonize.ops` calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.fx as fx

from tritonize.passes import DEFAULT_REGISTRY, Registry, run_passes
from tritonize.reporting import Report

GRAD_NOTE = "graph captured with gradients required: left as PyTorch (run under torch.inference_mode())"


def _structure(gm: fx.GraphModule) -> str:
    """The graph's tensor operations in order, without the size arithmetic that dynamic shapes add."""
    return "|".join(
        str(node.target) for node in gm.graph.nodes
        if node.op in ("call_function", "call_method")
        and getattr(node.target, "__module__", None) not in ("_operator", "operator")
        and "sym_size" not in str(node.target)
    )


def tritonize_backend(
    report: Report, *, skip: Collection[str] = (), registry: Registry | None = None, uses: int = 1
) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """A backend for `torch.compile(model, backend=tritonize_backend(report))`.

    Each graph Dynamo captures goes through the registered patterns (cleanup first), which replace what
    they recognise by `tritonize.ops` kernels and record replacements and fallbacks in `report`.
    skip: pattern names to leave out, e.g. {"linear_plain"} keeps PyTorch's matmul for linears with
    no activation or residual to fuse. registry: patterns to run (default: tritonize's own plus yours).
    uses: how many modules run each graph (regional compilation of N identical blocks): the report
    counts each replacement that many times.
    """
    (registry or DEFAULT_REGISTRY).check_names(skip)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        if torch.is_grad_enabled() and needs_grad:
            if GRAD_NOTE not in report.notes:
                report.notes.append(GRAD_NOTE)
            return gm.forward
        captured = _structure(gm)
        graph_report = Report()
        run_passes(gm, graph_report, registry=registry, skip=skip)
        # a recompile for new shapes that rewrites the same way is the same graph, not more replacements
        counts = Counter({kind: count * uses for kind, count in graph_report.replaced.items()})
        report.record_graph(f"{captured} -> {_structure(gm)}", counts)
        for node, reason in graph_report.fallbacks:
            report.fall_back(node, reason)
        return gm.forward

    return backend

"""What an optimization did to a model: which nodes were replaced by tritonize kernels, which fell back.

Filled by the passes (fx rewrites, the HF attention hook) and by the runtime; returned by
`tritonize.report(model)`. Must never import triton.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Report:
    """`replaced` maps a kind ("attention", "linear", "layer_norm", "rms_norm", ...) to a count;
    `fallbacks` lists (node, reason) for every candidate that kept its original PyTorch code.

    Counts from captured graphs are kept per graph structure, so a recompile of the same graph for
    new shapes replaces its earlier count instead of adding to it."""

    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compiles: int = 0  # graphs TorchDynamo handed to the backend (each one a trace and a rewrite)
    _direct: Counter = field(default_factory=Counter, repr=False)
    _per_graph: dict[str, Counter] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def replaced(self) -> Counter:
        with self._lock:
            return sum(self._per_graph.values(), Counter(self._direct))

    @property
    def graphs(self) -> int:
        """How many distinct captured graphs the tritonize backend has rewritten."""
        with self._lock:
            return len(self._per_graph)

    def record(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self._direct[kind] += count

    def record_graph(self, structure: str, counts: Counter) -> None:
        """The replacements made in one captured graph, identified by its structure (ops, not shapes)."""
        with self._lock:
            self._per_graph[structure] = Counter(counts)
            self.compiles += 1

    def fall_back(self, node: str, reason: str) -> None:
        with self._lock:
            if (node, reason) not in self.fallbacks:
                self.fallbacks.append((node, reason))

    def __str__(self) -> str:
        lines = ["tritonize report", "", "| replaced | count |", "|---|---|"]
        lines += [f"| {kind} | {count} |" for kind, count in sorted(self.replaced.items())] or ["| (none) | 0 |"]
        lines += ["", "| fell back | reason |", "|---|---|"]
        lines += [f"| {node} | {reason} |" for node, reason in self.fallbacks] or ["| (none) | |"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

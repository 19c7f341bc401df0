"""The bucketed runner: pads each call to its shape bucket and replays that bucket's CUDA graph.

One graph per (bucket, call signature), captured on first use from static input buffers; all graphs
share one memory pool. Before a new bucket's warm-up runs, a discovery run finds the Triton kernels the
bucket still needs and compiles them in parallel (`tritonize.kernels.compile`; opt out with
TRITONIZE_PARALLEL_COMPILE=0). Outputs are copied out for the caller unless asked otherwise. Calls are
serialized by a lock (the static buffers are shared). Imports neither triton (only tritonize.kernels.compile does)
nor transformers.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tritonize import tuning
from tritonize.kernels.compile import compile_in_parallel
from tritonize.runtime.buckets import ShapeBuckets, copy_into, pad_to, unpadded_outputs

logger = logging.getLogger("tritonize")

WARMUP_RUNS = 2  # eager runs on a side stream before capture (Dynamo compiles, kernels load)
# "0" (or false/no/off) turns off the parallel compile of a new bucket's kernels: they then compile one
# after another during the first warm-up run, as Triton does by itself
PARALLEL_COMPILE_ENV = "TRITONIZE_PARALLEL_COMPILE"


def parallel_compile_enabled() -> bool:
    """False when $TRITONIZE_PARALLEL_COMPILE is 0, false, no or off (read at every new bucket)."""
    return os.environ.get(PARALLEL_COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's cyclic garbage collector paused within (reference counting still frees memory), restored after
    unless it was already off. Warm-up (TorchDynamo tracing, lazy imports, capture) allocates hundreds of
    thousands of objects while torch, transformers and sympy hold millions, so the collector's full passes
    cost 0.3 s of a bert-base first call in a new process (H100, torch 2.11: median 3.15 -> 2.84 s); what it
    would have found is collected at its next pass. Concurrent warm-ups in several threads may re-enable it
    early (only their speed changes); one turned off by the caller is never turned on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class VerificationError(RuntimeError):
    """The optimized model disagreed with the original beyond the tolerance (verify=True)."""


@dataclass
class _Bucket:
    """One captured shape: static inputs, the graph (CUDA only) and its static outputs."""

    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    outputs: object = None


class BucketedRunner:
    """Calls `compiled` (the rewritten model) with inputs padded to their bucket, through CUDA graphs.

    sequence_inputs: names of the [batch, seq, ...] tensor arguments padded along dims 0 and 1;
    `mask_name` (if the model takes an attention mask) is created as ones for the real tokens when the
    caller gives none, so padding never reaches the real outputs. Runs without autograd (outputs do
    not require grad), whether or not the caller is inside torch.no_grad / inference_mode.
    parallel_compile: before a new bucket's warm-up runs, compile the Triton kernels it still needs in
    parallel (a discovery run through `compiled` that skips their launches, see
    `tritonize.kernels.compile.compile_in_parallel`); pass False when `compiled` times kernels (tuning).
    """

    def __init__(
        self,
        compiled: Callable,
        original: Callable,
        signature: inspect.Signature,
        buckets: ShapeBuckets,
        *,
        cuda_graphs: bool,
        copy_outputs: bool,
        verify: Callable[[dict, object], None] | None,
        after_new_bucket: Callable[[], None] | None = None,
        mask_name: str | None,
        device: torch.device,
        pool: object = None,
        parallel_compile: bool = True,
    ) -> None:
        self.compiled, self.original, self.signature = compiled, original, signature
        self.buckets, self.cuda_graphs, self.copy_outputs = buckets, cuda_graphs, copy_outputs
        self.verify, self.mask_name = verify, mask_name
        # "cuda" and "cuda:0" are the same device: compare against the parameter's full device
        self.device = torch.device(device.type, torch.cuda.current_device()) if (
            device.type == "cuda" and device.index is None) else device
        self.after_new_bucket = after_new_bucket
        self.pool = pool
        self.parallel_compile = parallel_compile
        self.captures = 0
        kinds = {param.kind: param.name for param in signature.parameters.values()}
        self._var_keyword = kinds.get(inspect.Parameter.VAR_KEYWORD)
        self._var_positional = kinds.get(inspect.Parameter.VAR_POSITIONAL)
        named = [param for param in signature.parameters.values() if param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        self._named = [param.name for param in named]  # in the forward's order: the first tensor sets the shape
        self._named_set = frozenset(self._named)
        self._required = frozenset(param.name for param in named if param.default is inspect.Parameter.empty)
        self._entries: dict[tuple, _Bucket] = {}
        self._lock = threading.Lock()

    def forget_graphs(self) -> None:
        """Drops every captured bucket (the model's parameters moved: graphs would read the old memory)."""
        with self._lock:
            self._entries.clear()

    def __call__(self, *args, **kwargs):
        if not args and self._required <= kwargs.keys() <= self._named_set:
            call = {name: kwargs[name] for name in self._named if name in kwargs}  # what bind gives, sooner
        else:
            call = dict(self.signature.bind(*args, **kwargs).arguments)
            if self._var_positional is not None and call.get(self._var_positional):
                raise ValueError("tritonize: pass the model's inputs by name or position, not through *args")
            call.pop(self._var_positional, None)
            if self._var_keyword is not None:
                call.update(call.pop(self._var_keyword, {}))
        tensors = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError("tritonize: the optimized model needs at least one tensor input")
        first = next(iter(tensors.values()))
        if first.dim() < 2:
            raise ValueError(f"tritonize: inputs must be [batch, seq, ...]; got shape {tuple(first.shape)}")
        batch, seq = first.shape[:2]
        for name, t in tensors.items():
            if t.device != self.device:
                raise ValueError(f"tritonize: input {name} is on {t.device} but the model is on {self.device}")
            if t.dim() < 2 or tuple(t.shape[:2]) != (batch, seq):
                raise ValueError(f"tritonize: input {name} of shape {tuple(t.shape)} is not [batch, seq, ...] "
                                 f"= [{batch}, {seq}, ...] like the others")
        if self.mask_name and self.mask_name not in tensors:
            tensors[self.mask_name] = torch.ones(batch, seq, dtype=torch.long, device=first.device)
        padded = self.buckets.fit(batch, seq) if self.mask_name else (self.buckets.fit(batch, seq)[0], seq)
        static_args = {k: v for k, v in call.items() if k not in tensors and v is not None}
        key = (padded, tuple(sorted(tensors)), tuple(sorted((k, repr(v)) for k, v in static_args.items())))
        padded_inputs = {k: pad_to(v, *padded) for k, v in tensors.items()}
        with self._lock, torch.no_grad():  # inference only: graphs never record autograd
            entry = self._entries.get(key)
            fresh = entry is None
            with cyclic_gc_paused() if fresh else contextlib.nullcontext():  # a new bucket: compiles, captures
                if fresh:
                    entry = self._entries[key] = self._capture(padded_inputs, static_args, padded)
                out = self._run(entry, padded_inputs, static_args)
            out = unpadded_outputs(out, (batch, seq), padded, copy=self.cuda_graphs and self.copy_outputs)
        if fresh and self.after_new_bucket is not None:
            self.after_new_bucket()
        if fresh and self.verify is not None:
            self.verify({**static_args, **tensors}, out)
        return out

    def _capture(self, inputs: dict[str, torch.Tensor], static_args: dict, padded: tuple[int, int]) -> _Bucket:
        if not (self.cuda_graphs and next(iter(inputs.values())).is_cuda):
            return _Bucket(inputs={})
        start = time.perf_counter()
        logger.info("tritonize: new bucket batch=%d seq=%d: compiling (first bucket only) and capturing...", *padded)
        entry = _Bucket(inputs={k: v.clone() for k, v in inputs.items()})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compile_kernels_in_parallel(entry.inputs, static_args, padded)
            for _ in range(WARMUP_RUNS):
                self.compiled(**entry.inputs, **static_args)
        torch.cuda.current_stream().wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self.pool):
            entry.outputs = self.compiled(**entry.inputs, **static_args)
        self.captures += 1
        logger.info("tritonize: captured bucket batch=%d seq=%d in %.2f s", *padded, time.perf_counter() - start)
        return entry

    def _compile_kernels_in_parallel(self, inputs: dict[str, torch.Tensor], static_args: dict,
                                     padded: tuple[int, int]) -> int:
        """A discovery run of `compiled` that skips (and records) every Triton launch needing a compile, then
        those compiles in a thread pool; returns how many kernels it compiled. Skipped launches leave their
        outputs unwritten, which is safe for an encoder forward: its indices come from the inputs (see
        compile_in_parallel, which also steps aside inside a CUDA-graph capture). Not while tuning: it times
        real launches."""
        if not (self.parallel_compile and parallel_compile_enabled()) or tuning.is_autotuning():
            return 0
        start = time.perf_counter()
        compiled = compile_in_parallel(lambda: self.compiled(**inputs, **static_args))
        logger.info("tritonize: bucket batch=%d seq=%d: compiled %d kernels in parallel in %.2f s", *padded,
                    compiled, time.perf_counter() - start)
        return compiled

    def _run(self, entry: _Bucket, inputs: dict[str, torch.Tensor], static_args: dict):
        if entry.graph is None:
            return self.compiled(**inputs, **static_args)
        copy_into([entry.inputs[name] for name in inputs], list(inputs.values()))
        entry.graph.replay()
        return entry.outputs

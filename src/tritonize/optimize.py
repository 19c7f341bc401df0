"""optimize_model(): the one public entry point, its options, fallbacks and verify mode.

Switches HF attention to tritonize's kernel, captures the forward with TorchDynamo and the tritonize
backend (fx rewrites onto fused kernels), and runs it through shape-bucketed CUDA graphs.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Sequence

import torch
import torch.fx.experimental._config as fx_config

from tritonize import tuning
from tritonize.kernels.reference import RELATIVE_TOLERANCE
from tritonize.passes import pack_sibling_linears
from tritonize.passes.hf_attention import set_attention_implementation, use_tritonize_attention
from tritonize.reporting import Report
from tritonize.runtime.backend import tritonize_backend
from tritonize.runtime.buckets import ShapeBuckets
from tritonize.runtime.cuda_graphs import BucketedRunner, VerificationError, cyclic_gc_paused

__all__ = ["optimize_model", "report", "VerificationError"]

DEFAULT_MAX_SEQ_LEN = 512  # for models whose config names no maximum
# TorchDynamo keeps at most `recompile_limit` compiled versions per code object (8 by default) and
# then runs it eagerly, silently: every optimized instance of a model class and every shape change
# counts, so a process optimizing several models of one class would lose the kernels. Raised (never
# lowered) by optimize_model; the one process-wide setting tritonize touches.
MIN_RECOMPILE_LIMIT = 64
# End-to-end tolerance of verify mode: the kernels' per-op tolerance, compounded over the layers.
VERIFY_TOLERANCE_FACTOR = 20
_HAS_SIZE_OBLIVIOUS = hasattr(fx_config, "backed_size_oblivious")  # see _one_trace_for_size_one


def _target(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward is optimized: a SentenceTransformer's transformer, else the model."""
    # a SentenceTransformer's module is imported already; importing it here would cost seconds
    sentence_transformers = sys.modules.get("sentence_transformers")
    if sentence_transformers is not None and isinstance(model, sentence_transformers.SentenceTransformer):
        first = model[0]
        inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(f"tritonize: this SentenceTransformer's first module {type(first).__name__} holds no model")
        return inner
    return model


def _mark_batch_and_seq_dynamic(values) -> None:
    """Symbolic batch and sequence sizes from the first trace on, so one graph serves every bucket (a new
    bucket costs a CUDA-graph capture, not a recompile). Traced under `_one_trace_for_size_one`, a first
    call at batch 1 does not specialize the batch either."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(value, 0)
            torch._dynamo.maybe_mark_dynamic(value, 1)


def _one_trace_for_size_one():
    """TorchDynamo specializes sizes 0 and 1, so a model first called at batch 1 was traced again at its first
    larger batch (4.4 s of warm-up for that bucket on an H100). Size-oblivious reasoning about backed sizes
    keeps a size-1 dim symbolic: one trace for every batch. Scoped to tritonize's own compiled calls; where
    this PyTorch lacks the setting, the second trace stays."""
    if _HAS_SIZE_OBLIVIOUS:
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _repeated_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of identical blocks (BERT's encoder.layer, Llama's layers): the longest
    ModuleList of two or more modules of one class, or None."""
    stacks = [m for m in model.modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(block) for block in m}) == 1]
    return max(stacks, key=len, default=None)


def _compile_blocks(blocks: torch.nn.ModuleList, backend) -> None:
    """Regional compilation: every block runs one compiled copy of its class's forward (traced once for
    all of them: parameters are graph inputs), so warm-up traces one block instead of the whole model."""
    compiled = torch.compile(type(blocks[0]).forward, backend=backend)
    for block in blocks:
        def block_forward(*args, block=block, **kwargs):
            _mark_batch_and_seq_dynamic((*args, *kwargs.values()))
            with _one_trace_for_size_one():
                return compiled(block, *args, **kwargs)

        block.forward = block_forward


def _compile_other_children(target: torch.nn.Module, backend) -> list[torch.nn.Module]:
    """Compiles, each whole, the target's direct children that hold parameters and no stack of blocks (BERT's
    embeddings and pooler: their lookups, adds and LayerNorm then run as one kernel, the pooler's linear and
    tanh as another); returns them."""
    regions = []
    for child in target.children():
        stacked = any(isinstance(m, torch.nn.ModuleList) for m in child.modules())
        if stacked or next(child.parameters(), None) is None:
            continue
        compiled = torch.compile(child.forward, backend=backend)

        def child_forward(*args, compiled=compiled, **kwargs):
            _mark_batch_and_seq_dynamic((*args, *kwargs.values()))
            with _one_trace_for_size_one():
                return compiled(*args, **kwargs)

        child.forward = child_forward
        regions.append(child)
    return regions


@contextlib.contextmanager
def _original_forwards(regions: list[torch.nn.Module]):
    """Within it, the compiled regions run their original (uncompiled) forward: what verify compares against."""
    saved = [region.__dict__.pop("forward") for region in regions]
    try:
        yield
    finally:
        for region, forward in zip(regions, saved, strict=True):
            region.forward = forward


def _compiled_forward(target: torch.nn.Module, report: Report) -> tuple[Callable, list[torch.nn.Module]]:
    """(the forward to run, the regionally compiled modules: empty when the whole forward is compiled). Models
    built as a stack of identical blocks compile one block for all and each other child holding parameters
    whole; others compile their whole forward."""
    pack_sibling_linears(target)
    blocks = _repeated_blocks(target)
    if blocks is not None:
        _compile_blocks(blocks, tritonize_backend(report, uses=len(blocks)))
        return target.forward, [*blocks, *_compile_other_children(target, tritonize_backend(report))]
    compiled = torch.compile(target.forward, backend=tritonize_backend(report))

    def forward_with_dynamic_shapes(**inputs):
        _mark_batch_and_seq_dynamic(inputs.values())
        with _one_trace_for_size_one():
            return compiled(**inputs)

    return forward_with_dynamic_shapes, []


def _autotuned(forward):
    def forward_with_autotuning(*args, **kwargs):
        with tuning.autotuning():
            return forward(*args, **kwargs)

    return forward_with_autotuning


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MIN_RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * MIN_RECOMPILE_LIMIT)


def _leaves(out, prefix: str = "output"):
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif isinstance(out, dict):
        for key, value in out.items():
            yield from _leaves(value, key)
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            yield from _leaves(value, f"{prefix}[{i}]")


def optimize_model(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    cuda_graphs: bool = True,
    buckets: dict[str, Sequence[int]] | ShapeBuckets | None = None,
    verify: bool = False,
    copy_outputs: bool = True,
    tolerance: float | None = None,
    tune: bool = False,
) -> torch.nn.Module:
    """Makes `model` run on tritonize's fused Triton kernels; returns the same object, optimized in place.

    dtype: cast the weights first (None keeps them: an fp32 model stays fp32). cuda_graphs: replay
    each shape bucket from a CUDA graph (CUDA models only). buckets: {"batch": [...], "seq": [...]}
    padded sizes (default powers of two, sequence up to the model's maximum). verify: check the first
    call of every bucket against the original model and raise VerificationError past `tolerance`
    (relative error; default 20x the kernels' per-dtype tolerance). copy_outputs=False returns the
    graph's own output buffers, which the next call overwrites (faster, for callers that consume
    outputs at once). tune: on the first call of each bucket, time the candidate configs of every
    kernel launch the tuning cache does not know yet and store the fastest (seconds per new shape;
    later processes reuse them, see tritonize.tuning). Calls from several threads are serialized.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize_model takes a torch.nn.Module, got {type(model).__name__}")
    target = _target(model)
    if getattr(target, "_tritonize_report", None) is not None:
        raise ValueError("this model is already optimized by tritonize")
    if dtype is not None:
        if dtype not in RELATIVE_TOLERANCE:
            raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        model.to(dtype)
    if target is not model:
        model.eval()  # SentenceTransformer.encode switches to eval anyway
    if model.training:
        raise ValueError("tritonize optimizes inference: call model.eval() first")
    parameter = next(target.parameters(), None)
    if parameter is None:
        raise ValueError(f"{type(target).__name__} has no parameters to run on a device")

    _raise_recompile_limit()
    found = Report()
    with cyclic_gc_paused():  # torch.compile's first use imports much of torch._dynamo and torch._inductor
        previous_attention = use_tritonize_attention(target, found)
        original_forward = target.forward
        signature = inspect.signature(original_forward)
        compiled, regions = _compiled_forward(target, found)
    if tune:
        compiled = _autotuned(compiled)
    config = getattr(target, "config", None)
    max_seq_len = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    shape_buckets = (ShapeBuckets.from_user(buckets, max_seq_len) if buckets is not None
                     else ShapeBuckets.powers_of_two(max_seq_len))
    kernel_tolerance = RELATIVE_TOLERANCE.get(parameter.dtype, RELATIVE_TOLERANCE[torch.float32])
    limit = tolerance if tolerance is not None else VERIFY_TOLERANCE_FACTOR * kernel_tolerance

    def check_against_original(inputs: dict, out) -> None:
        if previous_attention is not None:
            set_attention_implementation(target, previous_attention)
        try:
            with torch.no_grad(), _original_forwards(regions):
                expected = original_forward(**inputs)
        finally:
            if previous_attention is not None:
                set_attention_implementation(target, "tritonize")
        worst = ("", 0.0)
        for (name, got), (_, want) in zip(_leaves(out), _leaves(expected), strict=False):
            error = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
            if not error <= worst[1]:
                worst = (name, error)
        if not worst[1] <= limit:
            raise VerificationError(f"tritonize verify: {worst[0]} differs from the original model by relative "
                                    f"error {worst[1]:.3e} > {limit:.1e}; report: {found.fallbacks or 'no fallbacks'}")

    def check_capture() -> None:
        if found.graphs == 0:
            found.fall_back(type(target).__name__, "TorchDynamo ran the forward eagerly: no graph reached the "
                            "tritonize backend (a graph break everywhere, or its recompile limit)")

    on_cuda = parameter.is_cuda
    runner = BucketedRunner(
        compiled, original_forward, signature, shape_buckets,
        cuda_graphs=cuda_graphs and on_cuda, copy_outputs=copy_outputs,
        verify=check_against_original if verify else None,
        after_new_bucket=check_capture,
        mask_name="attention_mask" if "attention_mask" in signature.parameters else None,
        device=parameter.device,
        pool=torch.cuda.graph_pool_handle() if cuda_graphs and on_cuda else None,
        parallel_compile=not tune,  # tuning times real launches, which a discovery run would skip
    )
    target.forward = runner
    target._tritonize_report = found
    target._tritonize_runner = runner
    return model


def report(model: torch.nn.Module) -> Report:
    """What optimize_model replaced in `model` and what fell back, with reasons (print it for a table)."""
    found = getattr(_target(model), "_tritonize_report", None)
    if found is None:
        raise ValueError("this model was not optimized by tritonize.optimize_model")
    return found

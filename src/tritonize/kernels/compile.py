"""Compiling the Triton kernels a piece of code needs in parallel, before running it for real.

Triton compiles a kernel variant the first time it is launched, one after another, although its compiles
release the GIL for much of their work. `compile_in_parallel(run)` calls `run` once as a *discovery* run
in which every launch that would need a compile is recorded and skipped, then compiles all recorded
variants at once in a thread pool (Triton 3.6's `AsyncCompileMode` + `JITFunction.preload`) and, in the
same threads, right after each compile, builds the kernel's launcher and loads it, so that the next real run
finds every kernel in Triton's in-memory cache ready to launch. Must never import torch.fx, Dynamo or
transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import _async_compile

from tritonize.kernels.common import INTERPRETED

logger = logging.getLogger("tritonize")

MAX_WORKERS = 8
# Only kernels defined in these modules are skipped and compiled in parallel: tritonize's own, whose outputs
# are never used as indices (see compile_in_parallel). Any other Triton kernel, e.g. one in a user's pattern,
# compiles and launches during the discovery run as it would without it.
DISCOVERED_MODULES: tuple[str, ...] = ("tritonize.",)


@dataclass(frozen=True)
class _Pending:
    """A kernel variant seen in a discovery run: what `JITFunction.preload` needs to compile it."""

    jit_function: object
    device: int
    key: str
    specialization_data: str


# The hook is process-wide (triton.knobs), the discovery is per thread: a launch from a thread that is not
# discovering compiles and runs as usual. `_installs` counts the discoveries running in all threads.
_local = threading.local()
_lock = threading.Lock()
_installs = 0


def _restored_constant(value: object) -> object:
    """A constexpr value as `JITFunction.preload` rebuilds it from the JSON of the specialization data."""
    if tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(value["constexpr"])
    return value


def _preload_is_faithful(constants: dict, specialization_data: str) -> bool:
    """Whether preload would compile the same constexprs as the launch: the specialization data is JSON, so
    a tuple comes back as a list, a torch.dtype as its name and a string such as "fp16" as a Triton dtype.
    Such a kernel is not skipped: it compiles and runs during the discovery run, as it would without it."""
    try:
        restored = json.loads(specialization_data)["constant_vals"]
    except (ValueError, KeyError, TypeError):
        return False
    if len(restored) != len(constants):
        return False
    for original, value in zip(constants.values(), restored, strict=True):
        value = _restored_constant(value)
        if type(value) is not type(original) or not bool(value == original):
            return False
    return True


def _skip_and_record(*, fn, compile, **_) -> bool | None:
    """triton.knobs.runtime.jit_cache_hook: called before each compile. True = compile nothing and launch
    nothing (`JITFunction.run` returns at once); None = compile and launch as usual."""
    pending = getattr(_local, "pending", None)
    if pending is None:  # another thread, or this thread's compile phase
        return None
    if _capturing():
        return None  # a launch being captured into a CUDA graph must really be recorded
    if not str(fn.module).startswith(DISCOVERED_MODULES):
        return None  # not tritonize's: its garbage output might feed an index, so it really runs
    data = compile["specialization_data"]
    if not _preload_is_faithful(compile["constants"], data):
        logger.debug("tritonize: %s compiles during discovery (its constexprs do not survive JSON)", fn.name)
        return None
    jit_function = fn.jit_function
    pending.setdefault((id(jit_function), compile["device"], compile["key"]),
                       _Pending(jit_function, compile["device"], compile["key"], data))
    return True


def _install() -> bool:
    global _installs
    with _lock:
        if triton.knobs.runtime.jit_cache_hook not in (None, _skip_and_record):
            return False
        triton.knobs.runtime.jit_cache_hook = _skip_and_record
        _installs += 1
        return True


def _uninstall() -> None:
    global _installs
    with _lock:
        _installs -= 1
        if _installs == 0 and triton.knobs.runtime.jit_cache_hook is _skip_and_record:
            triton.knobs.runtime.jit_cache_hook = None


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _discovery_possible() -> bool:
    """Compiled Triton on a CUDA device: the interpreter (TRITON_INTERPRET=1) compiles nothing and calls no
    hook, and without CUDA tritonize launches no Triton kernel."""
    return not INTERPRETED and torch.cuda.is_available()


def _refusal() -> str | None:
    if not _discovery_possible():
        return "Triton runs interpreted or CUDA is unavailable"
    if getattr(_local, "pending", None) is not None:
        return "a discovery run is already active in this thread"
    if _async_compile.active_mode.get() is not None:
        return "an AsyncCompileMode is already active"
    if _capturing():
        return "a CUDA graph is being captured"
    return None


def _on_device(device: int):
    """preload compiles for Triton's current device, which on CUDA is torch's."""
    return torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext()


def _prepare_launch(kernel, device: int) -> None:
    """What Triton does at a compiled kernel's first launch, one kernel after another: build its launcher (a C
    extension per argument signature, compiled with the host's C compiler: about half a second each on a cold
    cache) and load its binary onto the device. A kernel that fails to load is left as never loaded, so that
    its first launch starts over (and raises as it would have); the failure is logged at debug level."""
    with _on_device(device):
        try:
            kernel._init_handles()
        except Exception as err:
            if kernel.module is None:
                kernel._run = None
            logger.debug("tritonize: loading a kernel compiled in parallel failed (%s: %s)", type(err).__name__, err)


class _LoadAfterCompile:
    """The executor AsyncCompileMode hands each compile to: the pool runs the compile and then, in the same
    thread, prepares the compiled kernel's launch (`_prepare_launch`) on the device current where the preload
    submitted it (`_compile_all` preloads each kernel on its own device), while other kernels still compile."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool

    def submit(self, compile_kernel: Callable[[], object]):
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0

        def compile_and_load():
            kernel = compile_kernel()
            _prepare_launch(kernel, device)
            return kernel

        return self.pool.submit(compile_and_load)


def compile_in_parallel(run: Callable[[], object], workers: int | None = None) -> int:
    """Calls `run()` once as a discovery run, then compiles in `workers` threads (default min(8, CPU count))
    every Triton kernel variant it would have compiled; returns how many are now in Triton's in-memory cache.

    During the discovery run, a launch of a kernel from DISCOVERED_MODULES (tritonize's own) whose variant is
    not compiled yet is recorded and skipped:
    nothing is compiled and nothing is launched, so that kernel's outputs keep whatever the memory held.
    Launches of variants already compiled run as usual. `run`'s result is discarded; an exception it raises
    is logged at debug level and ends the discovery early (what was recorded is still compiled): the real
    run that follows raises it again if it was not caused by the skipped launches. A compile that fails is
    logged at debug level and left to the next real launch, which compiles again and raises as it always
    did. Only the calling thread's launches are skipped; other threads compile and launch as usual.

    What makes this safe, and what `run` must respect: skipped kernels leave garbage (possibly NaN or Inf)
    in their outputs, so `run` must not use device data computed by Triton kernels as indices, lengths or
    host-side decisions that could fault or change shapes: torch indexing ops (embedding, gather,
    index_select) fed with such data may trigger a device-side assert, which poisons the CUDA context.
    tritonize's own kernels are safe with garbage inputs: attention reads its key-padding mask only as
    booleans and keeps its key range within [0, kv_len); decode attention clamps its sequence lengths and key
    starts to the cache; the rotary cache write skips positions outside the cache; the embedding + norm kernel
    reads nothing outside its tables (an id outside gives NaN); the GEMMs, GEMVs, norms and rotary kernels
    index by shapes and strides only; no op reads device data on the host. Encoder forwards
    (what `optimize_model`'s bucketed runner discovers) take their indices from the caller's inputs (input
    ids, attention masks, positions): safe. A decode loop that feeds tokens chosen from the model's output
    back into its embedding is not (generation/ does not use this). Kernels from other modules (a user's own
    Triton kernels in a custom pattern) are never skipped: they compile and launch as usual.

    A no-op returning 0, without calling `run`, when discovery cannot work: Triton runs interpreted
    (TRITON_INTERPRET=1) or CUDA is unavailable, another jit_cache_hook is installed, this thread is
    already discovering or inside an AsyncCompileMode, or the current stream is capturing a CUDA graph.
    Never call it while timing kernels (autotuning): the skipped launches would be timed as free.
    """
    refusal = _refusal()
    if refusal is not None:
        logger.debug("tritonize: no parallel compile: %s", refusal)
        return 0
    if not _install():
        logger.debug("tritonize: no parallel compile: another triton.knobs.runtime.jit_cache_hook is installed")
        return 0
    pending: dict[tuple, _Pending] = {}
    _local.pending = pending
    try:
        run()
    except Exception as err:  # the real run repeats it; a skipped launch's garbage may have caused it
        logger.debug("tritonize: the discovery run stopped early (%s: %s); compiling the %d kernels found so far",
                     type(err).__name__, err, len(pending))
    finally:
        _local.pending = None
        _uninstall()
    if not pending:
        return 0
    try:
        return _compile_all(list(pending.values()), workers)
    except Exception as err:  # e.g. a Triton whose internals changed: the kernels compile at their next launch
        logger.warning("tritonize: the parallel compile of %d kernels failed (%s: %s); they compile at their first "
                       "launch instead (TRITONIZE_PARALLEL_COMPILE=0 turns the parallel compile off)",
                       len(pending), type(err).__name__, err)
        return 0


def _compile_all(pending: list[_Pending], workers: int | None) -> int:
    workers = max(1, min(workers or min(MAX_WORKERS, os.cpu_count() or 1), len(pending)))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tritonize-compile") as pool:
        mode = _async_compile.AsyncCompileMode(_LoadAfterCompile(pool), ignore_errors=True)
        try:
            with mode:  # its exit waits for every compile and puts the kernels into their JIT caches
                for item in pending:
                    try:
                        with _on_device(item.device):
                            item.jit_function.preload(item.specialization_data)
                    except Exception as err:
                        logger.debug("tritonize: parallel compile of %s not started (%s: %s)",
                                     item.jit_function, type(err).__name__, err)
        finally:
            # AsyncCompileMode.__exit__ leaves itself active if a finalizer raised: this thread's later
            # compiles would go to this pool, which is shut down below
            if _async_compile.active_mode.get() is mode:
                _async_compile.active_mode.set(None)
    for future in mode.raw_futures:
        if future.exception() is not None:
            logger.debug("tritonize: a parallel compile failed; the kernel's next launch compiles it again (%s: %s)",
                         type(future.exception()).__name__, future.exception())
    ready = sum(item.key in item.jit_function.device_caches[item.device][0] for item in pending)
    logger.debug("tritonize: %d of %d kernels compiled in %d threads in %.2f s", ready, len(pending), workers,
                 time.perf_counter() - start)
    return ready

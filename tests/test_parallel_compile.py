"""Parallel compilation of a new bucket's Triton kernels: a discovery run that skips launches needing a compile,
then those compiles in a thread pool (CPU: the no-op, the opt-outs and the bookkeeping; GPU: real compiles)."""

import inspect
import json
import logging
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import transformers
import triton
import triton.language as tl
from helpers import assert_close, poisoned
from triton.runtime import _async_compile
from triton.runtime.jit import JitFunctionInfo, serialize_specialization_data

import tritonize
from tritonize import tuning
from tritonize.kernels import compile as parallel
from tritonize.kernels.compile import compile_in_parallel
from tritonize.runtime import cuda_graphs
from tritonize.runtime.buckets import ShapeBuckets
from tritonize.runtime.cuda_graphs import BucketedRunner

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=64)


def test_optimized_model_outputs_unchanged(device, caplog):
    config = transformers.BertConfig(**TINY_BERT)
    reference = transformers.AutoModel.from_config(config, attn_implementation="eager").eval().to(device)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval().to(device)
    model.load_state_dict(reference.state_dict())
    tritonize.optimize_model(model, verify=True)
    ids = torch.randint(3, 100, (3, 13), device=device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0
    caplog.set_level(logging.INFO, logger="tritonize")
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        if device == "cpu":  # the interpreter compiles nothing: a no-op that does not even run the model
            ran = []
            assert compile_in_parallel(lambda: ran.append(model(input_ids=ids, attention_mask=mask))) == 0
            assert ran == [] and triton.knobs.runtime.jit_cache_hook is None
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real], want[real], torch.float32, scale=10)
    torch.testing.assert_close(again, got)
    if device == "cuda" and cuda_graphs.parallel_compile_enabled():
        assert "kernels in parallel" in caplog.text


class Doubled(torch.nn.Module):
    def forward(self, x):
        return {"y": 2 * x}


def tiny_runner(model, calls, **kwargs):
    def compiled(**inputs):
        calls.append({k: tuple(v.shape) for k, v in inputs.items()})
        return model(**inputs)

    return BucketedRunner(compiled, model.forward, inspect.signature(model.forward), ShapeBuckets.powers_of_two(64, 8),
                          cuda_graphs=False, copy_outputs=True, verify=None, mask_name=None,
                          device=torch.device("cpu"), **kwargs)


def test_runner_discovers_unless_opted_out_or_tuning(monkeypatch, caplog):
    discoveries = []

    def fake_compile_in_parallel(run):
        discoveries.append(run())
        return 3

    monkeypatch.setattr(cuda_graphs, "compile_in_parallel", fake_compile_in_parallel)
    caplog.set_level(logging.INFO, logger="tritonize")
    calls = []
    runner = tiny_runner(Doubled(), calls)
    x = torch.randn(4, 16)
    monkeypatch.delenv(cuda_graphs.PARALLEL_COMPILE_ENV, raising=False)
    assert runner._compile_kernels_in_parallel({"x": x}, {}, (4, 16)) == 3
    assert calls == [{"x": (4, 16)}] and torch.equal(discoveries[0]["y"], 2 * x)
    assert "bucket batch=4 seq=16: compiled 3 kernels in parallel" in caplog.text
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(cuda_graphs.PARALLEL_COMPILE_ENV, off)
        assert runner._compile_kernels_in_parallel({"x": x}, {}, (4, 16)) == 0
    monkeypatch.setenv(cuda_graphs.PARALLEL_COMPILE_ENV, "1")
    with tuning.autotuning():  # tuning times real launches: none may be skipped
        assert runner._compile_kernels_in_parallel({"x": x}, {}, (4, 16)) == 0
    opted_out = tiny_runner(Doubled(), calls, parallel_compile=False)
    assert opted_out._compile_kernels_in_parallel({"x": x}, {}, (4, 16)) == 0
    assert len(discoveries) == 1 and len(calls) == 1
    assert runner._compile_kernels_in_parallel({"x": x}, {}, (4, 16)) == 3 and len(discoveries) == 2


def test_tune_turns_discovery_off():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    assert tritonize.optimize_model(model)._tritonize_runner.parallel_compile
    tuned = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    assert not tritonize.optimize_model(tuned, tune=True)._tritonize_runner.parallel_compile


# -- the bookkeeping, with stand-ins for Triton's JIT functions (CPU) --------------------------------


class FakeCompiledKernel:
    """What compile_in_parallel uses of a CompiledKernel: _init_handles (launcher and binary, as at a first
    launch), which sets module and _run."""

    def __init__(self, key, loads_fail=False, after_load=None):
        self.key, self.loads_fail, self.after_load = key, loads_fail, after_load
        self.module, self._run, self.prepared_in = None, None, None

    def _init_handles(self):
        self.prepared_in = threading.current_thread().name
        self._run = "launcher"
        if self.loads_fail:
            raise RuntimeError(f"cannot load {self.key}")
        self.module = f"module {self.key}"
        if self.after_load is not None:
            self.after_load(self.key)


class FakeJitFunction:
    """What compile_in_parallel uses of a JITFunction: device_caches and preload, which submits its compile to
    the active AsyncCompileMode like Triton's does. compile_first: {key: function} called in the compile thread
    before that kernel compiles; after_load(key): called once a kernel is loaded."""

    def __init__(self, failing=(), loads_failing=(), compile_first=None, after_load=None):
        self.device_caches = defaultdict(lambda: ({}, {}, None, None, None))
        self.failing, self.loads_failing, self.preloaded, self.compiled_in = set(failing), set(loads_failing), [], []
        self.compile_first, self.after_load = compile_first or {}, after_load

    def preload(self, specialization_data):
        key = json.loads(specialization_data)["key"]
        self.preloaded.append(key)
        mode = _async_compile.active_mode.get()
        assert mode is not None, "preload must run under an AsyncCompileMode"

        def compile_kernel():
            self.compiled_in.append(threading.current_thread().name)
            if key in self.compile_first:
                self.compile_first[key]()
            if key in self.failing:
                raise RuntimeError(f"cannot compile {key}")
            return FakeCompiledKernel(key, loads_fail=key in self.loads_failing, after_load=self.after_load)

        def finalize(kernel):
            self.device_caches[0][0][key] = kernel

        return mode.submit(key, compile_kernel, finalize)

    def launch(self, key, constants):
        """What JITFunction.run does on a cache miss: ask the jit_cache_hook; True = nothing compiled, no launch."""
        data = serialize_specialization_data("fake", {}, constants, {}, SimpleNamespace(), key)  # as Triton does
        hook = triton.knobs.runtime.jit_cache_hook
        if hook is not None and hook(key=key, repr="fake", fn=JitFunctionInfo(__name__, "fake", self),
                                     compile={"key": key, "device": 0, "constants": constants,
                                              "specialization_data": data},
                                     is_manual_warmup=False, already_compiled=False):
            return "skipped"
        return "launched"


@pytest.fixture
def as_if_compiled(monkeypatch):
    """Discovery enabled on this machine (as on a GPU with compiled Triton), no hook installed, and this
    module's kernels discovered as tritonize's own are."""
    monkeypatch.setattr(parallel, "_discovery_possible", lambda: True)
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(parallel, "DISCOVERED_MODULES", ("tritonize.", __name__))


def test_kernels_outside_tritonize_launch_during_discovery(as_if_compiled, monkeypatch):
    """A user's kernel (a module not in DISCOVERED_MODULES) may feed an index: it compiles and runs."""
    monkeypatch.setattr(parallel, "DISCOVERED_MODULES", ("tritonize.",))
    fake, seen = FakeJitFunction(), []
    assert compile_in_parallel(lambda: seen.append(fake.launch("user", {}))) == 0
    assert seen == ["launched"] and fake.preloaded == []


def test_discovery_skips_records_and_compiles_in_threads(as_if_compiled, caplog):
    fake = FakeJitFunction(failing={"bad"}, loads_failing={"unloadable"})
    seen = {}

    def run():
        seen["a"] = [fake.launch("a", {(3,): 64}), fake.launch("a", {(3,): 64})]
        seen["b"] = fake.launch("b", {(3,): 128, (4,): "gelu"})
        seen["unloadable"] = fake.launch("unloadable", {(3,): 256})
        seen["bad"] = fake.launch("bad", {(3,): 1.5})
        # constexprs that preload would rebuild differently (tuple -> list, "fp16" -> a Triton dtype,
        # torch.float16 -> its name) compile and launch as usual
        seen["unfaithful"] = [fake.launch("t", {(3,): (1, 2)}), fake.launch("s", {(3,): "fp16"}),
                              fake.launch("d", {(3,): torch.float16})]
        other = threading.Thread(target=lambda: seen.setdefault("other thread", fake.launch("o", {(3,): 1})))
        other.start()
        other.join()
        raise ValueError("garbage read on the host")  # ends the discovery; what was found still compiles

    caplog.set_level(logging.DEBUG, logger="tritonize")
    assert compile_in_parallel(run, workers=2) == 3
    assert seen == {"a": ["skipped", "skipped"], "b": "skipped", "unloadable": "skipped", "bad": "skipped",
                    "unfaithful": ["launched", "launched", "launched"], "other thread": "launched"}
    assert fake.preloaded == ["a", "b", "unloadable", "bad"]  # one compile per kernel variant
    kernels = fake.device_caches[0][0]
    assert set(kernels) == {"a", "b", "unloadable"}  # "bad" is left to its next real launch
    assert all(name.startswith("tritonize-compile") for name in fake.compiled_in)
    # launchers built and binaries loaded in the compile threads, not at the first launch
    assert all(kernels[key].module == f"module {key}" and kernels[key].prepared_in.startswith("tritonize-compile")
               for key in ("a", "b"))
    # a kernel that did not load is left as never loaded: its first launch tries again (and raises there)
    assert kernels["unloadable"].module is None and kernels["unloadable"]._run is None
    assert "cannot load unloadable" in caplog.text
    assert "cannot compile bad" in caplog.text and "garbage read on the host" in caplog.text
    assert triton.knobs.runtime.jit_cache_hook is None and _async_compile.active_mode.get() is None
    assert fake.launch("c", {(3,): 1}) == "launched"  # after the discovery, launches are real again


def test_a_launcher_is_built_while_other_kernels_still_compile(as_if_compiled):
    """Each kernel's launch is prepared right after its own compile, not once every compile has finished:
    here the slow kernel's compile waits for the fast kernel's launcher."""
    fast_loaded, waited = threading.Event(), []
    fake = FakeJitFunction(compile_first={"slow": lambda: waited.append(fast_loaded.wait(timeout=10))},
                           after_load=lambda key: key == "fast" and fast_loaded.set())
    assert compile_in_parallel(lambda: [fake.launch("slow", {}), fake.launch("fast", {})], workers=2) == 2
    assert waited == [True]
    assert all(kernel.module is not None for kernel in fake.device_caches[0][0].values())


def test_discovery_steps_aside(as_if_compiled, monkeypatch):
    fake, ran = FakeJitFunction(), []

    def foreign_hook(**kwargs):
        return None

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", foreign_hook)
    assert compile_in_parallel(lambda: ran.append(fake.launch("a", {}))) == 0
    assert ran == [] and triton.knobs.runtime.jit_cache_hook is foreign_hook  # another hook: left alone
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)

    def nested():
        ran.append(compile_in_parallel(lambda: ran.append("inner ran")))
        ran.append(fake.launch("a", {}))

    assert compile_in_parallel(nested) == 1
    assert ran == [0, "skipped"] and fake.preloaded == ["a"]
    assert compile_in_parallel(lambda: ran.append("nothing to compile")) == 0


def test_a_broken_compile_phase_falls_back_to_compiles_at_launch(as_if_compiled, caplog):
    fake = FakeJitFunction()
    del fake.device_caches  # finalizing the compile raises, inside AsyncCompileMode.__exit__
    assert compile_in_parallel(lambda: fake.launch("a", {})) == 0
    assert "they compile at their first launch instead" in caplog.text
    assert _async_compile.active_mode.get() is None  # else this thread's later compiles would go to a dead pool
    assert triton.knobs.runtime.jit_cache_hook is None


# -- real compiles (GPU) -----------------------------------------------------------------------------


@triton.jit
def _scale_kernel(X, Y, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok) * FACTOR, mask=ok)


def fresh_factors(count: int) -> list[int]:
    """Constexprs no earlier run compiled, so Triton's disk cache has none of these kernels either."""
    base = 1000 + time.time_ns() % 10**9
    return [base + i for i in range(count)]


def scale(x: torch.Tensor, factor: int, out: torch.Tensor | None = None) -> torch.Tensor:
    out = poisoned(x.shape, x.dtype, x.device) if out is None else out
    _scale_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), FACTOR=factor, BLOCK=256)
    return out


@pytest.mark.gpu
def test_compiles_kernels_in_parallel_without_launching_them(monkeypatch):
    monkeypatch.setattr(parallel, "DISCOVERED_MODULES", ("tritonize.", __name__))
    compiles = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda **kwargs: compiles.append(kwargs["key"]))
    kernel_cache = _scale_kernel.device_caches[torch.cuda.current_device()][0]
    cached_before = len(kernel_cache)
    x = torch.randn(1000, device="cuda")
    first, second, other = fresh_factors(3)
    during = {}

    def run():
        during["outs"] = [scale(x, first), scale(x, second), scale(x, first)]
        thread = threading.Thread(target=lambda: during.setdefault("other thread", scale(x, other)))
        thread.start()
        thread.join()

    assert compile_in_parallel(run) == 2
    torch.cuda.synchronize()
    assert all(out.isnan().all() for out in during["outs"]), "a skipped launch wrote its output"
    torch.testing.assert_close(during["other thread"], x * other)  # other threads compile and launch as usual
    assert len(compiles) == 3 and len(kernel_cache) == cached_before + 3
    # the launchers are built and the binaries loaded in the compile threads: the first launch only launches
    assert all(kernel.module is not None for kernel in kernel_cache.values())
    for factor in (first, second):
        torch.testing.assert_close(scale(x, factor), x * factor)
    assert len(compiles) == 3, "a kernel compiled in parallel was compiled again at its launch"
    assert triton.knobs.runtime.jit_cache_hook is None


class Scaled(torch.nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return {"y": scale(x, self.factor)}


@pytest.mark.gpu
def test_runner_compiles_a_new_bucket_in_parallel(monkeypatch, caplog, graph_captures):
    monkeypatch.setattr(parallel, "DISCOVERED_MODULES", ("tritonize.", __name__))
    caplog.set_level(logging.INFO, logger="tritonize")
    x = torch.randn(2, 7, device="cuda")
    for factor, env, expected in zip(fresh_factors(2), ("1", "0"), (1, None), strict=True):
        monkeypatch.setenv(cuda_graphs.PARALLEL_COMPILE_ENV, env)
        caplog.clear()
        model = Scaled(factor)
        runner = BucketedRunner(model, model.forward, inspect.signature(model.forward),
                                ShapeBuckets.powers_of_two(64, 8), cuda_graphs=True, copy_outputs=True, verify=None,
                                mask_name=None, device=torch.device("cuda"))
        torch.testing.assert_close(runner(x)["y"], x * factor)
        torch.testing.assert_close(runner(x + 1)["y"], (x + 1) * factor)  # the graph's replay
        if expected is None:
            assert "in parallel" not in caplog.text
        else:
            assert f"compiled {expected} kernels in parallel" in caplog.text
    assert len(graph_captures) == 2

"""Test helpers: relative error against the fp64 reference with per-dtype thresholds, NaN-poisoned outputs, and
Python in a fresh process (kernels compiled for a GPU target, not interpreted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tritonize.kernels.reference import RELATIVE_TOLERANCE


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / denom if denom > 0 else err


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """Fails on any NaN/Inf in out, a shape mismatch, or relative error above the dtype's threshold."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite elements (unwritten?)"
    err = relative_error(out, ref)
    tol = RELATIVE_TOLERANCE[dtype] * scale
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} for {dtype}"


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element the kernel fails to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _specialization(value: object) -> object:
    """What Triton compiles a kernel argument into: tensors by dtype and 16-byte alignment, integers by
    width, divisibility by 16 and == 1, other scalars by type, constexprs (and launch options) by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return ("int", -(2**31) <= value < 2**31, value % 16 == 0, value == 1)
    return type(value).__name__


class LaunchRecorder:
    """Stands in for a Triton kernel in its module (`monkeypatch.setattr(module, name, LaunchRecorder(...))`):
    appends (name, grid) to `launches` at each launch, then launches the kernel."""

    def __init__(self, kernel, name: str, launches: list) -> None:
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append((self.name, grid))
        return self.kernel[grid]


class KernelLaunches:
    """Records the compile-relevant signature of every interpreted Triton kernel launch while `recording`.

    Two runs that launch the same set of signatures would compile nothing new on a GPU. Works only under
    the interpreter (TRITON_INTERPRET=1): install with `install(monkeypatch)`.
    """

    def __init__(self) -> None:
        self.recording = False
        self.signatures: set[tuple] = set()

    def install(self, monkeypatch) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        launches = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if launches.recording:
                arguments = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
                launches.signatures.add((kernel.__name__, *sorted(
                    (name, _specialization(value)) for name, value in arguments.items())))
            return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", run)

    def wrap(self, function):
        """function, recording the launches made while it runs."""

        def recorded(*args, **kwargs):
            self.recording = True
            try:
                return function(*args, **kwargs)
            finally:
                self.recording = False

        return recorded


def run_python(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process with tritonize's src on the path and, unless `interpret`, without
    TRITON_INTERPRET: its kernels compile for real targets (sm_90 needs no GPU to compile for)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


_COMPILE_FOR_SM90 = """
import json, sys
from importlib import import_module
from tritonize.debug import compile_for_gpu

module, name, types, constexprs, num_warps = json.loads(sys.argv[1])
print(compile_for_gpu(getattr(import_module(module), name), types, constexprs, num_warps=num_warps).asm["ptx"])
"""


def sm90_ptx(module: str, kernel: str, types: dict[str, str], constexprs: dict, num_warps: int = 4) -> str:
    """The PTX of `module.kernel` compiled for sm_90 by `tritonize.debug.compile_for_gpu` (no GPU needed), in a
    fresh process without the interpreter; types, constexprs as it takes them. A compile error fails the
    calling test with its message."""
    result = run_python("-c", _COMPILE_FOR_SM90, json.dumps([module, kernel, types, constexprs, num_warps]))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_pdl_waits_first(ptx: str) -> None:
    """A kernel compiled with PDL waits for the previous kernel (griddepcontrol.wait) before its first global
    load, and lets the next kernel launch only after that wait: a load above the wait would race with the
    kernel that writes its inputs."""
    body = ptx[ptx.index(".entry"):]
    wait, allow_next = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
    first_load = re.search(r"\bld\.global|cp\.async", body)
    assert first_load is not None and 0 <= wait < first_load.start() and wait < allow_next, (
        f"wait at {wait}, first load at {first_load and first_load.start()}, launch_dependents at {allow_next}")

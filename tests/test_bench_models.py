"""The model benchmark's new-process measurement (no GPU needed: the subprocess is replaced) and the profile
script's switches."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonize.kernels
from tritonize.bench import models


@pytest.mark.parametrize("at_start", [None, "/tmp/triton-cache-at-start"])
def test_new_processes_get_tritons_cache_folder_as_it_was_at_start(monkeypatch, at_start):
    """torch.compile points TRITON_CACHE_DIR at inductor's folder when it first compiles: the subprocesses must
    not inherit that, or they look for tritonize's kernels in a folder that never held them."""
    monkeypatch.setattr(models, "_TRITON_CACHE_DIR_AT_START", at_start)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/tmp/torchinductor_user/triton/0")
    seen, seconds = [], iter([4.5, 2.6, 2.4, 2.5])

    def fake_run(args, **kwargs):
        seen.append(kwargs["env"].get("TRITON_CACHE_DIR"))
        return subprocess.CompletedProcess(args, 0, stdout=f"noise\n{next(seconds)}\n", stderr="")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    first, warm = models.first_call_in_new_process("bert-base", warm_runs=3)
    assert (first, warm) == (4.5, [2.6, 2.4, 2.5])
    assert seen == [at_start] * 4


def test_profile_script_turns_pdl_off_in_every_kernel_module(monkeypatch):
    """benchmarks/profile_model.py --no-pdl: every kernels module that decides PDL per launch says no."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import profile_model
    finally:
        sys.path.pop(0)
    modules = [importlib.import_module(f"tritonize.kernels.{info.name}")
               for info in pkgutil.iter_modules(tritonize.kernels.__path__) if info.name != "common"]
    deciding = [module for module in modules if hasattr(module, "pdl_supported")]
    assert len(deciding) >= 6
    for module in deciding:  # restored after the test
        monkeypatch.setattr(module, "pdl_supported", lambda device: True)
    profile_model.launch_without_pdl()
    assert [module.__name__ for module in deciding if module.pdl_supported(torch.device("cuda"))] == []

"""The model benchmark's new-process measurement (no GPU needed: the subprocess is replaced) and the switch that
profiling without PDL uses."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess

import pytest
import torch

import tritonize.kernels
from tritonize.bench import models
from tritonize.kernels import common


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


def test_pdl_switch_reaches_every_kernel_module(monkeypatch):
    """common.PDL_ENABLED (benchmarks/profile_model.py --no-pdl) turns PDL off for every launch: each kernels
    module that decides PDL asks common.pdl_supported, which says yes on an sm_90 GPU only while it is on."""
    modules = [importlib.import_module(f"tritonize.kernels.{info.name}")
               for info in pkgutil.iter_modules(tritonize.kernels.__path__) if info.name != "common"]
    deciding = [module for module in modules if hasattr(module, "pdl_supported")]
    assert len(deciding) >= 6
    assert [module.__name__ for module in deciding if module.pdl_supported is not common.pdl_supported] == []
    monkeypatch.setattr(common, "_pdl_capable", lambda device: device.type == "cuda")  # as on an H100
    assert common.pdl_supported(torch.device("cuda"))
    monkeypatch.setattr(common, "PDL_ENABLED", False)
    assert not common.pdl_supported(torch.device("cuda"))

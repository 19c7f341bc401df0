"""The advanced tutorials (04 flash attention, 05 teaching a pattern) run to the end on this machine."""

import runpy
from pathlib import Path

import pytest
import torch

from tritonize.passes import DEFAULT_REGISTRY

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


@pytest.mark.parametrize("name", ["04_flash_attention.py", "05_teach_a_new_model.py"])
def test_tutorial_runs(name, capsys):
    patterns = DEFAULT_REGISTRY.names()
    torch._dynamo.reset()
    runpy.run_path(str(TUTORIALS / name), run_name="__main__")  # each asserts its own checks
    assert "relative error" in capsys.readouterr().out
    assert DEFAULT_REGISTRY.names() == patterns  # tutorial 5 unregisters its pattern

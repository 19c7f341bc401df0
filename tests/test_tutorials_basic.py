"""The basic tutorials (01-03) run to completion: each checks itself against torch and asserts."""

import runpy
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


@pytest.mark.parametrize("script", ["01_tiled_matmul.py", "02_swizzling.py", "03_online_softmax.py"])
def test_tutorial_runs(script, capsys):
    runpy.run_path(str(TUTORIALS / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "matches torch" in out

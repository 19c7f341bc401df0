"""The README's Python examples run as written: CPU ones everywhere, CUDA ones on the GPU."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block):
    if "cuda" in block and not torch.cuda.is_available():
        pytest.skip("this example uses CUDA tensors")
    exec(compile(block, str(README), "exec"), {})

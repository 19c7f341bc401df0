"""Every Python code block in docs/*.md runs as written (CUDA ones only where a GPU is present)."""

import re
from pathlib import Path

import pytest
import torch
import triton

from tritonize.passes import DEFAULT_REGISTRY

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
BLOCKS = [(doc, block) for doc in DOCS for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)]


@pytest.mark.parametrize("doc, block", BLOCKS, ids=[f"{doc.stem}-{i}" for i, (doc, _) in enumerate(BLOCKS)])
def test_docs_python_block_runs(doc, block):
    if "cuda" in block and not torch.cuda.is_available():
        pytest.skip("this example uses CUDA tensors")
    if "compile_for_gpu" in block and triton.knobs.runtime.interpret:
        pytest.skip("this example compiles for a GPU target: kernels must not be interpreted (tests/test_debug.py "
                    "compiles in a fresh process instead)")
    patterns_before = set(DEFAULT_REGISTRY.names())
    torch._dynamo.reset()
    try:
        exec(compile(block, str(doc), "exec"), {"__name__": f"docs_{doc.stem}"})
    finally:  # an example that teaches tritonize a pattern must not leak it into other tests
        for name in set(DEFAULT_REGISTRY.names()) - patterns_before:
            DEFAULT_REGISTRY.unregister(name)


COMMANDS = [(doc, line.split("#")[0].split())
            for doc in DOCS for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
            for line in block.splitlines() if line.startswith("tritonize ")]


@pytest.mark.parametrize("doc, argv", COMMANDS, ids=[" ".join(argv[1:3]) for _, argv in COMMANDS])
def test_docs_tritonize_commands_run(doc, argv):
    if torch.cuda.is_available() and argv[1].startswith("bench"):
        pytest.skip("benchmarks run for minutes on a GPU")
    from tritonize.cli import main

    assert main(argv[1:]) == 0, f"{doc.name}: {' '.join(argv)}"

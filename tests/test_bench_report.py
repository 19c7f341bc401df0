"""Benchmark result files: speed-ups compare like with like; JSON, Markdown and the PNG plot are written."""

import json

import pytest
import torch

from tritonize.bench.report import Row, markdown_table, speedups, write_results


def rows():
    return [
        Row("linear", "M1 N8 K8", "tritonize", "float16", 2.0, 1.0, "TFLOP/s", 0.5, 1e-4),
        Row("linear", "M1 N8 K8", "cublas+separate-epilogue", "float16", 3.0, None, "", None, None),
        Row("linear", "M1 N8 K8", "cublas-linear-only", "float16", 1.0, None, "", None, None),
    ]


def test_speedup_ignores_engines_doing_less_work():
    assert speedups(rows()) == {("linear", "M1 N8 K8", "float16"): (1.5, "cublas+separate-epilogue")}
    assert "**1.50x** (cublas+separate-epilogue)" in markdown_table(rows())


def test_write_results_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_results("kernels", {"rows": rows(), "ceilings": {"copy_gb_per_s": 1.0}}, tmp_path)
    data = json.loads(path.read_text())
    assert {"card", "torch", "triton", "transformers", "date", "command"} <= set(data)
    assert len(data["rows"]) == 3 and data["ceilings"] == {"copy_gb_per_s": 1.0}
    assert path.with_suffix(".md").read_text().startswith("# kernels")
    assert path.with_suffix(".png").stat().st_size > 1000


def test_cosine_column_only_when_a_row_has_one():
    assert "min cosine" not in markdown_table(rows())
    with_cosine = [*rows(), Row("encoder", "b1 s16", "tritonize", "float16", 0.3, None, "", None, 1e-3, 1.0,
                                0.99999912)]
    lines = markdown_table(with_cosine).splitlines()
    assert "| min cosine |" in lines[0]
    assert {line.count("|") for line in lines} == {11}  # every row has the header's columns
    assert "| 0.999999 |" in lines[-1] and lines[2].endswith("|  | **1.50x** (cublas+separate-epilogue) |")


def test_min_embedding_cosine_pools_the_real_tokens_only():
    from tritonize.bench.models import min_embedding_cosine

    torch.manual_seed(0)
    hidden, ref = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    hidden[1, 4:] = float("nan")  # padding never reaches the embedding
    expected = min(torch.nn.functional.cosine_similarity(
        hidden[b, : int(mask[b].sum())].double().mean(0), ref[b, : int(mask[b].sum())].double().mean(0), dim=0
    ).item() for b in range(3))
    assert min_embedding_cosine(hidden, ref, mask) == pytest.approx(expected, rel=1e-12)
    assert min_embedding_cosine(ref, ref, mask) == pytest.approx(1.0, rel=1e-12)

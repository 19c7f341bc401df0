"""Benchmark result files: speed-ups compare like with like; JSON, Markdown and the PNG plot are written."""

import json

import pytest

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

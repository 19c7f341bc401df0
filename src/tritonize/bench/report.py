"""Benchmark results: rows, provenance (card, versions, date, command), JSON, Markdown and a plot."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton


@dataclasses.dataclass
class Row:
    workload: str
    shape: str
    engine: str
    dtype: str
    median_ms: float
    rate: float | None  # in `unit`: TFLOP/s, GB/s, tokens/s ...
    unit: str
    fraction_of_ceiling: float | None  # rate over the card's measured ceiling for that unit
    max_rel_error: float | None  # ||out - ref|| / ||ref|| against an fp32 reference
    warmup_s: float | None = None  # seconds of the first call at this shape (compile, capture)
    min_cosine: float | None = None  # encoders: the lowest cosine of a mean-pooled embedding to the reference's


def provenance() -> dict:
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def card_slug(card: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-").replace("--", "-")


# Engines that do less work than tritonize (a GEMM without the epilogue tritonize fuses): shown as a
# ceiling, never the engine tritonize is compared with.
PARTIAL_ENGINES = ("cublas-linear-only",)


def speedups(rows: list[Row]) -> dict[tuple[str, str, str], tuple[float, str]]:
    """For each (workload, shape, dtype): tritonize's speed-up over the fastest engine doing the same work."""
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.workload, row.shape, row.dtype)].append(row)
    result = {}
    for key, group in groups.items():
        ours = [r for r in group if r.engine == "tritonize"]
        others = [r for r in group if r.engine != "tritonize" and r.engine not in PARTIAL_ENGINES]
        if ours and others:
            best = min(others, key=lambda r: r.median_ms)
            result[key] = (best.median_ms / ours[0].median_ms, best.engine)
    return result


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table; a "min cosine" column when any row has one."""
    ratio = speedups(rows)
    with_cosine = any(r.min_cosine is not None for r in rows)
    lines = [
        "| workload | shape | dtype | engine | median ms | rate | of ceiling | rel. error | "
        + ("min cosine | " if with_cosine else "") + "speed-up vs best other |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_cosine else ""),
    ]
    for r in rows:
        rate = f"{r.rate:.1f} {r.unit}" if r.rate is not None else ""
        frac = f"{r.fraction_of_ceiling:.0%}" if r.fraction_of_ceiling is not None else ""
        err = f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else ""
        speed = ""
        if r.engine == "tritonize" and (r.workload, r.shape, r.dtype) in ratio:
            x, other = ratio[(r.workload, r.shape, r.dtype)]
            speed = f"**{x:.2f}x** ({other})"
        cosine = ""
        if with_cosine:
            cosine = f"{r.min_cosine:.6f} | " if r.min_cosine is not None else " | "
        lines.append(f"| {r.workload} | {r.shape} | {r.dtype} | {r.engine} | {r.median_ms:.4f} | {rate} | {frac} "
                     f"| {err} | {cosine}{speed} |")
    return "\n".join(lines)


def plot_speedups(rows: list[Row], path: Path, title: str) -> bool:
    """A PNG of tritonize's speed-up over the fastest other engine per shape; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = speedups(rows)
    if not ratios:
        return False
    labels = [f"{workload}: {shape} ({dtype})" for workload, shape, dtype in ratios]
    values = [ratio for ratio, _ in ratios.values()]
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(labels) + 1.5))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of tritonize over the fastest engine doing the same work (same process, same card)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(name: str, payload: dict, out_dir: Path) -> Path:
    """Writes <name>-<card>.json, .md and (with matplotlib) .png under out_dir; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance()
    rows = payload.pop("rows")
    stem = f"{name}-{card_slug(meta['card'])}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({**meta, **payload, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in {**meta, **payload}.items())
    (out_dir / f"{stem}.md").write_text(f"# {name}\n\n{header}\n\n{markdown_table(rows)}\n")
    plot_speedups(rows, out_dir / f"{stem}.png", f"{name}, {meta['card']}, {meta['date'][:10]}")
    return json_path

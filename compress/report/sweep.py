"""A sweep's front as markdown (sweep.md) and HTML (report.html, with the accuracy-vs-latency plot)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from compress.data.cache import write_atomic
from compress.report.html import CHECK, STYLE, png, table
from compress.targets.native import cpu_model

HEADER = ("model", "structure", "metric [95% CI]", "drop", "latency p50 ms", "speed-up", "size MB", "params", "run")


def _cells(row: dict[str, Any], chosen: str | None) -> tuple[str, ...]:
    ci = row.get("ci95")
    interval = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    mark = " (chosen)" if row["label"] == chosen else ""
    status = "" if row["status"] in ("passed", "yardstick", "no validate stage") else f" ({row['status'][:80]})"
    params = f"{row['parameters'] / 1e6:.1f}M" if row.get("parameters") else ""
    return (
        f"{row['label']}{mark}{status}",
        row["structure"],
        f"{row['metric']} {row['value']:.4f}{interval}",
        f"{row['drop']:+.4f}",
        f"{row['latency_ms']['p50']:.2f}",
        f"{row['speedup']:.2f}x",
        f"{row['size_bytes'] / 1e6:.1f}",
        params,
        row["run"],
    )


def write_front(out: Path, result: dict[str, Any]) -> None:
    """A sweep's folder: sweep.json (the figures), sweep.md and report.html rendered from them."""
    write_atomic(out / "sweep.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out / "sweep.md", render_markdown(result).encode())
    write_atomic(out / "report.html", render_html(result).encode())


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        f"# Sweep {result['name']}: {result['task']}",
        "",
        f"CPU: {cpu_model()}; measured {result.get('created', '?')}. Every model ran every one of "
        f"{result['examples']} data.evaluation examples, "
        "batch 1, round-robin (interleaved); latency is the median per example. Drop and speed-up are against "
        "the teacher's fp32 export (the first row).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(_cells(r, result["chosen"])) + " |" for r in rows]
    lines += ["", result["verdict"], ""]
    return "\n".join(lines)


def render_html(result: dict[str, Any]) -> str:
    plot = _front_plot(result)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>edge-compress sweep: {html.escape(result['name'])}"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>edge-compress sweep: {html.escape(result['name'])}</h1>",
        f"<p>{html.escape(result['verdict'])}</p>",
        f"<p>CPU: {html.escape(cpu_model())}; {result['examples']} examples, batch 1, interleaved.</p>",
        f"<h2>Accuracy against latency</h2><img alt='front' src='data:image/png;base64,{plot}'>",
        "<h2>Levels</h2>",
        table(HEADER, [_cells(r, result["chosen"]) for r in result["rows"]]),
        CHECK + "</body></html>",
    ]
    return "\n".join(parts)


def _front_plot(result: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["latency_ms"]["p50"] for r in rows]
    ys = [r["value"] for r in rows]
    ax.plot(xs[1:], ys[1:], "o-", color="#1565c0", label="levels (final artifacts)")
    ax.scatter(xs[:1], ys[:1], color="#c62828", marker="s", s=50, label="teacher, fp32", zorder=3)
    for i, (r, x, y) in enumerate(zip(rows, xs, ys, strict=True)):
        mark = " (chosen)" if r["label"] == result["chosen"] else ""
        below = (0, -12) if i % 2 == 0 else (4, 4)  # neighbours' labels on alternate sides: close points stay legible
        ax.annotate(r["label"] + mark, (x, y), fontsize=8, xytext=below, textcoords="offset points")
        if r.get("ci95"):
            ax.plot([x, x], r["ci95"], color="#999", lw=1)
    if result["goal"] is not None:
        ax.axhline(ys[0] - result["goal"]["max_drop"], color="#2e7d32", ls="--", lw=1, label="goal")
    ax.set(xlabel="latency p50 ms (batch 1)", ylabel=rows[0]["metric"], title="task metric vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)

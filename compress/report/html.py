"""report.html: one self-contained page (plots embedded as PNG data URIs) a person reads after a run.

Plots (matplotlib, Agg): latency distribution per artifact and target, the accuracy-vs-size and
accuracy-vs-latency front across stages, the share of zero weights per layer, and the map of which compute
nodes ONNX Runtime runs in int8 and which in float. Then the validation table, the gate's verdict with the
likely cause and fix, the stages, warnings and the provenance card. Rendered from report.json alone, so
`edge-compress report RUN_DIR` re-renders it.
"""

from __future__ import annotations

import base64
import html
import io
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from compress.report.markdown import stage_note, stage_time, summary_rows
from compress.serving.bundle_check import sha256_of as sha256  # the server's own check (stdlib only)
from compress.targets.native import cpu_model
from exporters.native import ARCHES, library_path

PACKAGES = ("edge-compress", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "torchao")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")
COLORS = {"int8": "#2e7d32", "float": "#ef6c00", "custom": "#1565c0"}


def provenance(run_dir: Path, validate: dict[str, Any] | None) -> dict[str, Any]:
    """Recipe hash, package versions, CPU flags, ORT version and session settings, artifact hashes."""
    packages = {}
    for dist in PACKAGES:
        try:
            packages[dist] = version(dist)
        except PackageNotFoundError:
            continue

    flags: list[str] = []
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        flags = [f for f in line.partition(":")[2].split() if f in CPU_FLAGS]
    except OSError:
        pass
    recipe = run_dir / "resolved_recipe.yaml"
    artifacts = {}
    for stage in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(stage.glob("*.onnx")) + sorted(stage.glob("*.onnx.data")):
            artifacts[str(path.relative_to(run_dir))] = sha256(path)

    for arch in ARCHES:
        lib = library_path(arch)
        if lib.is_file():
            artifacts[f"native kernels ({arch}): {lib.name}"] = sha256(lib)
    out: dict[str, Any] = {
        "recipe_sha256": sha256(recipe) if recipe.is_file() else None,
        "python": platform.python_version(),
        "packages": packages,
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cpu_flags": flags},
        "artifact_sha256": artifacts,
    }
    if validate:
        if validate.get("model"):  # the file validate measured: `edge-compress package` ships only these bytes
            out["validated_model"] = validate["model"]
        out["onnxruntime_session"] = validate.get("session", {})
        out["targets"] = {
            name: {
                k: t["setup"].get(k)
                for k in ("kind", "cpu", "arch", "onnxruntime", "cpu_features", "custom_op_kernel", "threads")
            }
            for name, t in validate.get("targets", {}).items()
        }
    return out


# ------------------------------------------------------------------------------------------ plots


def png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _latency_plot(targets: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    groups = {"native": [], "emulated": []}  # type: dict[str, list[tuple[str, list[float]]]]
    for name, t in targets.items():
        where = "emulated" if t["setup"]["kind"] == "emulated" else "native"
        for role in ("reference", "artifact"):
            samples = t.get(role, {}).get("latency_samples_ms")
            if samples:
                label = f"{name}: {'fp32 reference' if role == 'reference' else 'artifact'}"
                groups[where].append((label, samples))
    panels = [(k, v) for k, v in groups.items() if v]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.6 + 0.6 * sum(len(v) for _, v in panels)), squeeze=False)
    for ax, (where, rows) in zip(axes[:, 0], panels, strict=True):
        ax.boxplot([r[1] for r in rows], vert=False, tick_labels=[r[0] for r in rows], showfliers=True)
        title = "latency per run, ms" + (" (EMULATED: not comparable with native)" if where == "emulated" else "")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png(fig)


def front_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """(stage, metric, size, latency) points measured on native x86-64 or by the stages themselves."""
    points: list[dict[str, Any]] = []
    for stage in report["stages"]:
        m = stage["metrics"]
        if stage["type"] == "distill" and "best_spearman" in m and m.get("parameters"):
            points.append(
                {
                    "label": "distilled (PyTorch)",
                    "metric": "spearman",
                    "value": m["best_spearman"],
                    "size_bytes": 4 * m["parameters"],
                    "latency_ms": None,
                }
            )
        if stage["type"] == "validate" and "x86_64" in m.get("targets", {}):
            t = m["targets"]["x86_64"]
            key = t["drop"]["metric"]
            for role, label in (("reference", "fp32 ONNX (export)"), ("artifact", "artifact (ONNX)")):
                if role in t and key in t[role]["task"]:
                    points.append(
                        {
                            "label": label,
                            "metric": key,
                            "value": t[role]["task"][key],
                            "size_bytes": t[role]["size_bytes"],
                            "latency_ms": t[role]["latency_ms"]["p50"],
                        }
                    )
    return points


def _front_plot(points: list[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    if len(points) < 2:
        return None
    metric = points[-1]["metric"]
    points = [p for p in points if p["metric"] == metric]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in points:
        left.scatter(p["size_bytes"] / 1e6, p["value"], s=40)
        left.annotate(
            p["label"], (p["size_bytes"] / 1e6, p["value"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
        if p["latency_ms"] is not None:
            right.scatter(p["latency_ms"], p["value"], s=40)
            right.annotate(
                p["label"], (p["latency_ms"], p["value"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
    left.set(xlabel="size MB", ylabel=metric, title=f"{metric} vs size")
    right.set(xlabel="latency p50 ms (native x86-64)", ylabel=metric, title=f"{metric} vs latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def _sparsity_plot(weights: list[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    if not weights:
        return None
    fig, ax = plt.subplots(figsize=(10, 2.8))
    ax.bar(range(len(weights)), [100 * w["zeros"] for w in weights], color="#546e7a")
    ax.set(ylabel="% zero weights", xlabel="weight matrix (graph order)", title="sparsity per layer of the artifact")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig)


def _node_map_plot(nodes: list[list[str]]) -> str | None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not nodes:
        return None
    per_row = 24
    rows = (len(nodes) + per_row - 1) // per_row
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.45 * rows))
    for i, (_, op, kind) in enumerate(nodes):
        r, c = divmod(i, per_row)
        ax.add_patch(plt.Rectangle((c, -r), 0.92, 0.85, color=COLORS[kind]))
        ax.text(c + 0.46, -r + 0.42, op[:6], ha="center", va="center", fontsize=5, color="white")
    counts = {k: sum(1 for n in nodes if n[2] == k) for k in COLORS}
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows + 0.9, 0.95)
    ax.axis("off")
    ax.set_title(
        "compute nodes ONNX Runtime runs (graph order): " + ", ".join(f"{k} {v}" for k, v in counts.items() if v),
        fontsize=10,
    )
    ax.legend(
        handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    return png(fig)


# ------------------------------------------------------------------------------------------- page

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#2e7d32;font-weight:bold}.fail{color:#c62828;font-weight:bold}
img{max-width:100%;display:block;margin:0.5em 0}code{background:#f3f3f3;padding:0 3px}
.card{border:1px solid #ccc;border-radius:6px;padding:0.5em 1em;background:#fafafa;font-size:0.85em}
"""
# Marks the page once the browser has decoded every plot: a headless browser test reads the attribute.
CHECK = (
    "<script>window.addEventListener('load',function(){var ok=0;for(var i of document.images)"
    "{if(i.complete&&i.naturalWidth>0)ok++}document.body.setAttribute('data-plots-decoded',ok)});</script>"
)


def table(header: tuple[str, ...], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(report: dict[str, Any]) -> str:
    validate = next((s["metrics"] for s in report["stages"] if s["type"] == "validate"), None)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>edge-compress: {html.escape(report['name'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>edge-compress run: {html.escape(report['name'])}</h1>",
        f"<p>Model <code>{html.escape(report['model'])}</code>, task {html.escape(report['task'])}, "
        f"created {html.escape(report['created'])}.</p>",
    ]
    if validate:
        parts.append("<h2>Gate</h2>")
        rows = []
        for name, t in validate["targets"].items():
            gate = t.get("gate", {})
            verdict = "no limits" if not gate.get("limits") else ("passed" if gate["passed"] else "FAILED")
            rows.append(
                (
                    name,
                    t["setup"]["kind"],
                    f"{t['agreement']['metric']} {t['agreement']['value']:.4f}",
                    "" if t["drop"]["value"] is None else f"{t['drop']['value']:+.4f}",
                    verdict,
                    "; ".join(gate.get("failures", [])),
                    gate.get("cause", ""),
                    gate.get("fix", ""),
                )
            )
        parts.append(
            table(
                (
                    "target",
                    "kind",
                    "agreement with fp32 (native)",
                    f"{validate['targets'][next(iter(validate['targets']))]['drop']['metric']} drop",
                    "gate",
                    "failures",
                    "likely cause",
                    "fix",
                ),
                rows,
            )
        )
        plots = [
            ("Latency", _latency_plot(validate["targets"])),
            ("Accuracy against size and latency", _front_plot(front_points(report))),
            ("Sparsity per layer", _sparsity_plot(validate.get("weights", []))),
            ("Quantized and float nodes", _node_map_plot(validate.get("node_map", []))),
        ]
        for title, png in plots:
            if png:
                parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{png}'>")
        parts.append("<h2>Validation</h2>")
        parts.append(table(("metric", "fp32 reference", "artifact", "comparison"), summary_rows(report)))
    parts.append("<h2>Stages</h2>")
    parts.append(
        table(
            ("#", "stage", "time s", "result"),
            [(f"{s['index']:02d}", s["type"], stage_time(s), stage_note(s)) for s in report["stages"]],
        )
    )
    parts.append(
        "<h2>Warnings</h2><ul>"
        + ("".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) or "<li>none</li>")
        + "</ul>"
    )
    prov = report.get("provenance")
    if prov:
        parts.append("<h2>Provenance</h2><div class='card'>" + _provenance_html(prov) + "</div>")
    parts.append(CHECK + "</body></html>")
    return "\n".join(parts)


def _provenance_html(prov: dict[str, Any]) -> str:
    rows = [("recipe (resolved) sha256", prov.get("recipe_sha256") or "")]
    rows.append(("python", prov.get("python", "")))
    rows += [(f"package {k}", v) for k, v in prov.get("packages", {}).items()]
    host = prov.get("host", {})
    rows.append(
        ("host CPU", f"{host.get('cpu')} ({host.get('machine')}); flags: {' '.join(host.get('cpu_flags', []))}")
    )
    if "onnxruntime_session" in prov:
        rows.append(("ONNX Runtime session settings", str(prov["onnxruntime_session"])))
    if "validated_model" in prov:
        model = prov["validated_model"]
        rows.append(("validated model (what package ships)", f"{model['path']}: sha256 {model['sha256']}"))
    for name, t in prov.get("targets", {}).items():
        rows.append((f"target {name}", ", ".join(f"{k}: {v}" for k, v in t.items() if v not in (None, []))))
    rows += [(f"sha256 {k}", v) for k, v in prov.get("artifact_sha256", {}).items()]
    return table(("what", "value"), rows)

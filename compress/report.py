"""report.json (for machines) and report.md (for people) of one run."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.data.cache import write_atomic
from compress.recipe import Recipe

if TYPE_CHECKING:
    from compress.pipeline import StageRecord


def write_report(run_dir: Path, recipe: Recipe, folder: Path | None, records: list[StageRecord]) -> dict[str, Any]:
    stages = [
        {
            "index": r.index,
            "type": r.type,
            "dir": r.dir.name,
            "reused": r.reused,
            "seconds": round(r.seconds, 2),
            "metrics": r.metrics,
        }
        for r in records
    ]
    warnings = [w for r in records for w in r.metrics.get("warnings", [])]
    targets: dict[str, Any] = {}
    for record in records:
        targets.update(record.metrics.get("targets", {}))
    report = {
        "name": recipe.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": recipe.task,
        "model": str(folder) if folder is not None else "new (trained in this run)",
        "stages": stages,
        "targets": targets,
        "warnings": warnings,
    }
    write_atomic(run_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(run_dir / "report.md", markdown(report).encode())
    return report


def _task_rows(data: str, ref: dict[str, Any], art: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Embedding: Spearman and Pearson; classification: accuracy (with its interval) and macro F1."""
    rows = []
    for name in ("spearman", "pearson", "accuracy", "f1_macro"):
        if name not in art:
            continue
        ci = art.get(f"{name}_ci95")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        label = name.replace("_", " ").capitalize() if name != "f1_macro" else "macro F1"
        rows.append(
            (f"{data} {label}", f"{ref[name]:.4f}", f"{art[name]:.4f}{interval}", f"{art[name] - ref[name]:+.4f}")
        )
    return rows


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, fp32 reference, artifact, comparison) for every target: the table people read."""
    rows: list[tuple[str, str, str, str]] = []
    for target, t in report["targets"].items():
        ref, art = t["reference"], t["artifact"]
        setup = t["setup"]
        rows.append((f"[{target}, {setup['kind']}]", "ONNX fp32", "artifact", ""))
        rows += _task_rows(setup["evaluation_set"], ref["task"], art["task"])
        fid = t["fidelity"]
        rows.append(("cosine to fp32 (mean / min)", "1", f"{fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f}", ""))
        shape = f"batch {setup['batch_size']}, seq {setup['sequence_length']}, {setup['threads']} threads"
        for p in ("p50", "p90", "p99"):
            rows.append(
                (
                    f"latency {p} ms ({shape})" if p == "p50" else f"latency {p} ms",
                    f"{ref['latency_ms'][p]:.2f}",
                    f"{art['latency_ms'][p]:.2f}",
                    f"{ref['latency_ms'][p] / art['latency_ms'][p]:.2f}x faster" if p == "p50" else "",
                )
            )
        rows.append(
            (
                "throughput (items/s)",
                f"{ref['latency_ms']['throughput_per_s']:.1f}",
                f"{art['latency_ms']['throughput_per_s']:.1f}",
                "",
            )
        )
        rows.append(
            (
                "model size MB",
                f"{ref['size_bytes'] / 1e6:.1f}",
                f"{art['size_bytes'] / 1e6:.1f}",
                f"{100 * t['size_ratio']:.0f}% of fp32",
            )
        )
        rows.append(
            (
                "peak memory MB",
                f"{ref['memory']['peak_rss_bytes'] / 1e6:.0f}",
                f"{art['memory']['peak_rss_bytes'] / 1e6:.0f}",
                "",
            )
        )
        kernels = art["kernels"]
        rows.append(
            (
                "int8 / float compute kernels run",
                f"{ref['kernels']['int8_total']} / {ref['kernels']['float_total']}",
                f"{kernels['int8_total']} / {kernels['float_total']}",
                ", ".join(f"{op} x{n}" for op, n in kernels["int8"].items()),
            )
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# edge-compress run: {report['name']}",
        "",
        f"Model: `{report['model']}`  ",
        f"Task: {report['task']}  ",
    ]
    lines += [
        f"Created: {report['created']}",
        "",
        "## Stages",
        "",
        "| # | stage | time s | notes |",
        "|---|---|---|---|",
    ]
    for s in report["stages"]:
        lines.append(f"| {s['index']:02d} | {s['type']} | {stage_time(s)} | {stage_note(s)} |")
    if report["targets"]:
        lines += [
            "",
            "## Validation",
            "",
            "| metric | fp32 reference | artifact | comparison |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
        lines += [
            "",
            "Task metrics carry a bootstrap 95% interval over the rated pairs; differences inside it are noise.",
            "Latency is measured interleaved with the reference on this machine and is noisy: compare ratios.",
        ]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["- none"]
    return "\n".join(lines) + "\n"


def stage_time(stage: dict[str, Any]) -> str:
    return "reused" if stage["reused"] else f"{stage['metrics'].get('seconds', stage['seconds']):.1f}"


def _export_note(m: dict[str, Any]) -> str:
    if "custom_ops" in m:  # a zoo model
        ops = ", ".join(f"{k} x{v}" for k, v in m["custom_ops"].items()) or "none (standard ops only)"
        return (
            f"{m['exporter']} opset {m['opset']}; attention {'/'.join(sorted(set(m['attention'])))}; "
            f"custom ops: {ops}, ran {m['custom_op_kernel']}; max abs diff vs PyTorch {m['max_abs_diff']:.1e} "
            f"over {len(m['shapes_checked'])} shapes"
        )
    fused = m["fused_ops"]
    fused_txt = ", ".join(f"{k} x{v}" for k, v in fused.items()) if isinstance(fused, dict) else fused
    return f"{m['exporter']} opset {m['opset']}; max abs diff vs PyTorch {m['max_abs_diff']:.1e}; fused: {fused_txt}"


def stage_note(stage: dict[str, Any]) -> str:
    m = stage["metrics"]
    if stage["type"] == "train":
        best: dict[str, Any] = next((h for h in m["history"] if h["epoch"] == m["best_epoch"]), {})
        metric = "accuracy" if "accuracy" in best else "bits_per_token"
        text = f"{m['epochs_run']} epochs, best {m['best_epoch']}: validation {metric} {best.get(metric, 0):.4f}"
        if "test" in m:
            t = m["test"]
            text += (
                f"; test accuracy {t['accuracy']:.4f} F1 {t['f1_positive']:.4f}"
                if "accuracy" in t
                else f"; test bits/token {t['bits_per_token']:.4f}"
            )
        return text
    if stage["type"] == "prune":
        return (
            f"{m['method']}: {m['parameters']:,} of {m['parameters_before']:,} parameters kept, "
            f"{100 * m['sparsity_total']:.1f}% zeros; zipped {m['compressed_size_bytes'] / 1e6:.1f} MB; {m['speed']}"
        )
    notes = {"distill": _distill_note, "export": _export_note, "quantize": _quantize_note, "qat": _qat_note}
    if stage["type"] in notes:
        return notes[stage["type"]](m)
    return ", ".join(stage["metrics"].get("targets", {})) or ""


def _quantize_note(m: dict[str, Any]) -> str:
    k = m["kernels"]
    cal = m.get("calibration")
    how = m["mode"] + (f" ({cal['method']} on {cal['sequences']} texts)" if cal else "")
    if m.get("preset"):
        how += f", preset {m['preset']['name']}"
    note = (
        f"{how}, per-channel {m['per_channel']}; {k['int8_total']} int8 kernels in ORT's graph, "
        f"{k['float_total']} float; {100 * m['size_ratio']:.0f}% of fp32 size"
    )
    search = m.get("accuracy_aware")
    if search:
        best = search["trials"][search["chosen"]]
        note += (
            f"; goal: {search['metric_name']} drop {best['drop']:.4f} ≤ {search['allowed_drop']:g} with "
            f"{len(best['in_float'])} nodes in float after {len(search['trials'])} trials"
        )
    return note


def _qat_note(m: dict[str, Any]) -> str:
    k = m["kernels"]
    return (
        f"QAT, preset {m['preset']['name']}: {m['epochs_run']} epochs, kept {m['best_epoch']} "
        f"({m['selection']} {m['best']:.4f}); ORT vs PyTorch cosine {m['ort_vs_torch_cosine_min']:.4f}; "
        f"{k['int8_total']} int8 kernels in ORT's graph, {k['float_total']} float; "
        f"{100 * m['size_ratio']:.0f}% of fp32 size"
    )


def _distill_note(m: dict[str, Any]) -> str:
    if "student" not in m:  # a Hugging Face embedding student
        note = (
            f"{m['student_layers']}-layer student of a {m['teacher_layers']}-layer teacher, "
            f"{m['epochs_run']} epochs, best {m['best_epoch']}: Lee Spearman {m['best_spearman']:.4f}"
        )
        if m.get("best_fidelity") is not None:
            note += f", cosine to the teacher {m['best_fidelity']:.4f} on {m['held_out_texts']} held-out texts"
        return note
    s = m["student"]
    text = (
        f"student d_model {s['d_model']}, {s['n_heads']} heads, {s['n_layers']} layers, d_ff {s['d_ff']} "
        f"({m['parameters']:,} of the teacher's {m['teacher_parameters']:,} parameters), "
        f"{m['epochs_run']} epochs, best {m['best_epoch']}"
    )
    if "test" in m:
        key = "accuracy" if "accuracy" in m["test"] else "bits_per_token"
        text += f"; test {key} {m['test'][key]:.4f} (teacher {m['teacher_test'][key]:.4f})"
    return text

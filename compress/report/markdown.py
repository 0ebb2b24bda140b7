"""report.md, and the rows and stage notes it shares with report.html and the CLI's summary."""

from __future__ import annotations

import json
from typing import Any


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
    """(metric, fp32 reference, artifact, comparison) for every target: the table people read.

    The reference column is always the fp32 model on native x86-64, on the same texts as the artifact.
    Latency on emulated targets is labelled emulated and has no reference to compare with.
    """
    rows: list[tuple[str, str, str, str]] = []
    for target, t in report["targets"].items():
        art, setup = t["artifact"], t["setup"]
        ref = t.get("reference")  # fp32 timed beside the artifact: native x86-64 only
        ref_task = t.get("reference_task") or (ref or {}).get("task", {})
        where = setup["kind"] + (f", {setup['cpu']}" if setup.get("cpu") and setup["kind"] != "native" else "")
        rows.append((f"[{target}, {where}]", "fp32, native x86-64", "artifact here", ""))
        texts = setup.get("evaluated_texts")
        of = setup.get("evaluation_texts")
        data = setup["evaluation_set"] + (f" (first {texts} of {of})" if texts and of and texts < of else "")
        rows += _task_rows(data, ref_task, art["task"])
        fid = t["fidelity"]
        rows.append(("cosine to fp32 (mean / min)", "1", f"{fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f}", ""))
        for key, label in (("agreement", "agreement with fp32"), ("consistency", "same as this artifact on x86-64")):
            if key in t:
                rows.append((f"{label} ({t[key]['metric']})", "", f"{t[key]['value']:.4f}", ""))
        rows += _latency_rows(t, ref)
        size = f"{100 * t['size_ratio']:.0f}% of fp32" if "size_ratio" in t else ""
        rows.append(
            ("model size MB", f"{ref['size_bytes'] / 1e6:.1f}" if ref else "", f"{art['size_bytes'] / 1e6:.1f}", size)
        )
        rows.append(
            (
                "peak memory MB" + (" (emulated process)" if setup["kind"] == "emulated" else ""),
                f"{ref['memory']['peak_rss_bytes'] / 1e6:.0f}" if ref else "",
                f"{art['memory']['peak_rss_bytes'] / 1e6:.0f}",
                "",
            )
        )
        kernels = art["kernels"]
        rows.append(
            (
                "int8 / float compute kernels run",
                f"{ref['kernels']['int8_total']} / {ref['kernels']['float_total']}" if ref else "",
                f"{kernels['int8_total']} / {kernels['float_total']}",
                ", ".join(f"{op} x{n}" for op, n in kernels["int8"].items()),
            )
        )
        if setup.get("custom_op_kernel"):
            rows.append(("attention ops ran as", "", setup["custom_op_kernel"], ""))
        gate = t.get("gate")
        if gate and gate.get("limits"):
            verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["failures"])
            rows.append(
                ("gate", _limits_text(gate["limits"]), verdict, gate.get("fix", "") if not gate["passed"] else "")
            )
    return rows


def _limits_text(limits: dict[str, Any]) -> str:
    parts = []
    if limits.get("max_drop") is not None:
        parts.append(f"drop <= {limits['max_drop']:g}")
    if limits.get("min_agreement") is not None:
        parts.append(f"agreement >= {limits['min_agreement']:g}")
    return ", ".join(parts)


def _latency_rows(t: dict[str, Any], ref: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    setup, art = t["setup"], t["artifact"]
    emulated = setup["kind"] == "emulated"
    shape = f"batch {setup['batch_size']}, seq {setup['sequence_length']}, {setup['threads']} threads"
    runs = art["latency_ms"]["runs"]
    tag = " EMULATED, not comparable with native" if emulated else ""
    rows = []
    for p in ("p50", "p90", "p99"):
        label = f"latency {p} ms ({shape}, {runs} runs{tag})" if p == "p50" else f"latency {p} ms"
        if p == "p99" and runs < 100:
            label += f" (~max: {runs} runs)"
        rows.append(
            (
                label,
                f"{ref['latency_ms'][p]:.2f}" if ref else "",
                f"{art['latency_ms'][p]:.2f}",
                f"{ref['latency_ms'][p] / art['latency_ms'][p]:.2f}x faster" if ref and p == "p50" else "",
            )
        )
    lat = art["latency_ms"]
    if "iqr" in lat:
        rows.append(
            (
                "latency spread ms (IQR / std)",
                f"{ref['latency_ms']['iqr']:.2f} / {ref['latency_ms']['std']:.2f}" if ref else "",
                f"{lat['iqr']:.2f} / {lat['std']:.2f}",
                "",
            )
        )
    rows.append(
        (
            "throughput (items/s)",
            f"{ref['latency_ms']['throughput_per_s']:.1f}" if ref else "",
            f"{lat['throughput_per_s']:.1f}",
            "",
        )
    )
    if "cold_start_ms" in art:
        rows.append(
            (
                "cold start ms (session creation)" + (" EMULATED" if emulated else ""),
                f"{ref['cold_start_ms']:.0f}" if ref else "",
                f"{art['cold_start_ms']:.0f}",
                "",
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
            "Native latency is measured interleaved with the reference and is noisy: compare ratios. Emulated latency "
            "(qemu) says nothing about a real CPU of that kind; emulation measures accuracy and agreement.",
        ]
    gated = [(n, t["gate"]) for n, t in report["targets"].items() if t.get("gate", {}).get("limits")]
    if gated:
        lines += ["", "## Gate", ""]
        for name, gate in gated:
            if gate["passed"]:
                lines.append(f"- **{name}**: passed ({_limits_text(gate['limits'])})")
            else:
                lines.append(
                    f"- **{name}: FAILED** ({'; '.join(gate['failures'])}). Likely cause: {gate['cause']}. "
                    f"Fix: {gate['fix']}."
                )
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["- none"]
    prov = report.get("provenance")
    if prov:
        host = prov["host"]
        lines += [
            "",
            "## Provenance",
            "",
            f"- recipe (resolved) sha256: `{prov['recipe_sha256']}`",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items()),
            f"- host: {host['cpu']} ({host['machine']}), flags {' '.join(host['cpu_flags'])}",
        ]
        if "onnxruntime_session" in prov:
            lines.append(f"- ONNX Runtime session: `{json.dumps(prov['onnxruntime_session'])}`")
        if "validated_model" in prov:  # the file validate measured; `edge-compress package` ships only it
            model = prov["validated_model"]
            lines.append(f"- validated model: `{model['path']}`, sha256 `{model['sha256']}`")
        lines += [f"- `{k}`: sha256 `{v}`" for k, v in prov["artifact_sha256"].items()]
        lines.append("")
        lines.append("Plots (latency, accuracy front, sparsity, int8/float node map): report.html.")
    return "\n".join(lines) + "\n"


def stage_time(stage: dict[str, Any]) -> str:
    return "reused" if stage["reused"] else f"{stage['metrics'].get('seconds', stage['seconds']):.1f}"


def _export_note(m: dict[str, Any]) -> str:
    if "custom_ops" in m:  # a zoo model
        ops = ", ".join(f"{k} x{v}" for k, v in m["custom_ops"].items()) or "none (standard ops only)"
        return (
            f"{m['exporter']} opset {m['opset']}; attention {'/'.join(sorted(set(m['attention'])))}; "
            f"custom ops: {ops}, ran {m['custom_op_kernel']}; "
            + (f"global layers: {m['global_attention']}; " if m.get("global_attention") else "")
            + f"max abs diff vs PyTorch {m['max_abs_diff']:.1e} over {len(m['shapes_checked'])} shapes"
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
                f"; test accuracy {t['accuracy']:.4f} macro-F1 {t['f1_macro']:.4f}"
                if "accuracy" in t
                else f"; test bits/token {t['bits_per_token']:.4f}"
            )
        return text
    if stage["type"] == "prune":
        note = (
            f"{m['method']}: {m['parameters']:,} of {m['parameters_before']:,} parameters kept, "
            f"{100 * m['sparsity_total']:.1f}% zeros; zipped {m['compressed_size_bytes'] / 1e6:.1f} MB; {m['speed']}"
        )
        if "task" in m:  # a classifier or tagger: its task metric on data.evaluation before and after
            t = m["task"]
            note += f"; {t['metric']} {t['before']:.4f} -> {t['after']:.4f}"
        return note
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
    return note + _tuning_note(m.get("graph_tuning"))


def _tuning_note(tuned: dict[str, Any] | None) -> str:
    """The graph tuning's choices and the medians they were made on (older reports have no int8 round)."""
    if not tuned:
        return ""
    rounds = [r for r in (tuned.get("int8"), tuned) if r and r.get("variants")]
    if not rounds:
        return ""
    timed = "; ".join(
        f"kept {r['chosen']} ("
        + ", ".join(f"{name} {v['p50_ms']:.2f} ms" for name, v in r["variants"].items() if "p50_ms" in v)
        + ")"
        for r in rounds
    )
    scaling = tuned.get("thread_scaling", {}).get("p50_ms")
    if scaling:
        timed += "; threads " + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in scaling.items())
    return f"; tuned on {tuned['cpu']}: {timed}"


def _qat_note(m: dict[str, Any]) -> str:
    k = m["kernels"]
    note = (
        f"QAT, preset {m['preset']['name']}: {m['epochs_run']} epochs, kept {m['best_epoch']} "
        f"({m['selection']} {m['best']:.4f}); ORT vs PyTorch cosine {m['ort_vs_torch_cosine_min']:.4f}; "
        f"{k['int8_total']} int8 kernels in ORT's graph, {k['float_total']} float; "
        f"{100 * m['size_ratio']:.0f}% of fp32 size"
    )
    if "task" in m:  # a classifier or tagger: the int8 graph against the fp32 one on data.evaluation
        t = m["task"]
        note += (
            f"; int8 {t['metric']} {t['int8'][t['metric']]:.4f} (fp32 {t['fp32'][t['metric']]:.4f}), "
            f"agreement {t['agreement']['value']:.4f}"
        )
    return note


def _distill_note(m: dict[str, Any]) -> str:
    if "labels" in m:  # a Hugging Face classifier or tagger
        note = f"{m['student_layers']}-layer student, {m['parameters']:,} parameters, {m['epochs_run']} epochs, "
        note += f"best {m['best_epoch']}: accuracy {m['best_accuracy']:.4f}"
        if m.get("teacher_layers"):
            note += (
                f" (its {m['teacher_layers']}-layer teacher: {m['teacher_parameters']:,} parameters, "
                f"accuracy {m['teacher_accuracy']:.4f})"
            )
        if "test" in m:
            note += f"; test accuracy {m['test']['accuracy']:.4f}"
        return note
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

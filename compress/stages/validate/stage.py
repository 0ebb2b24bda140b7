"""validate: the artifact on every target of the recipe, against its fp32 reference on native x86-64, as a gate.

Per target: the task metric, agreement with the fp32 reference run natively (equal predictions for
classification, cosine for embeddings), consistency with the same artifact run natively (where a target's
kernels differ, e.g. u8s8 saturation without VNNI), latency (warm-up, interleaved, every sample kept),
cold start, peak memory and the kernels ONNX Runtime runs there. Every target runs the same worker script
(compress/targets/worker.py) on a self-contained job folder. Emulated latency is labelled as such.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress import targets
from compress.artifact import Artifact
from compress.context import Context
from compress.errors import GateFailed, UserError
from compress.runtime import feeds
from compress.runtime.evaluation import TaskScoring, task_scoring
from compress.runtime.kernels import FLOAT_COMPUTE_OPS, INT8_OPS, kernels_of
from compress.runtime.latency import summarize
from compress.serving.bundle_check import sha256_of
from compress.stages.validate.config import ValidateStage
from compress.targets import Target
from compress.tasks.metrics import cosine_fidelity
from exporters import native

# How the timed sessions' threads wait (the server's way): they spin during a run and stop at its end.
SPINNING = "during runs only (session.force_spinning_stop)"


def run(artifact: Artifact, cfg: ValidateStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "onnx":
        raise UserError("stages: validate works on ONNX; put an export stage before it")
    positions = artifact.meta.get("max_positions")
    if isinstance(positions, int) and cfg.sequence_length > positions:
        raise UserError(
            f"stages: validate.sequence_length {cfg.sequence_length} exceeds the model's {positions} positions"
        )
    chosen = ctx.targets
    for target in chosen:
        _ready(target, ctx)
    native = targets.get("x86_64")
    if native.problem():
        raise UserError(f"targets: the fp32 reference runs natively on x86-64: {native.problem()}")

    measured = _measured_model(artifact.file("model"), ctx.run_dir)  # before the job folders link it in
    encode = feeds.encoder(artifact)
    texts = feeds.evaluation_texts(ctx)
    size = ctx.data.batch_size
    max_length = artifact.usable_length(ctx.data.max_length)
    scoring = task_scoring(ctx, artifact, max_length)
    batches = [encode(list(texts[i : i + size]), max_length, None) for i in range(0, len(texts), size)]
    # Latency inputs: real evaluation text, truncated/padded to exactly sequence_length tokens.
    timing = encode([texts[i % len(texts)] for i in range(cfg.batch_size)], cfg.sequence_length, cfg.sequence_length)
    jobs = _JobFolders(ctx.work_dir / "targets", artifact, batches, timing, cfg)
    jobs.output_length = max_length

    # The fp32 reference (and the artifact, for consistency) natively, timed only if x86_64 is a target.
    native_timed = any(t.kind == "native" for t in ctx.targets)
    ctx.log(f"validating natively on x86-64: {len(texts)} texts" + (f", {cfg.runs} timed runs" if native_timed else ""))
    base = _evaluate(native, jobs, jobs.full(native), ["reference", "artifact"], native_timed, ctx)

    results: dict[str, Any] = {}
    for target in chosen:
        started = time.perf_counter()
        subset = target.emulated or target.arch != native.arch
        if target.name == "x86_64":
            run_ = base
        else:
            job = jobs.subset(target, cfg.emulated_samples) if subset else jobs.full(target)
            ctx.log(f"validating on {target.describe()}: {job.texts} texts, {job.runs} timed runs")
            run_ = _evaluate(target, jobs, job, ["artifact"], True, ctx)
        results[target.name] = _result(target, run_, base, jobs, ctx, (scoring, len(texts)))
        results[target.name]["seconds"] = round(time.perf_counter() - started, 1)  # this target's own wall time

    for name, result in results.items():
        result["gate"] = _gate(name, result, cfg, artifact, ctx.task)
    if not jobs.optimized_graph().is_file():  # x86_64 is not a target: the node map still comes from it
        _measure(native, jobs, "artifact", base["job"])
    metrics = {
        "model": measured,
        "targets": results,
        "node_map": kernels_of(jobs.optimized_graph())["nodes"],
        "weights": weight_sparsity(artifact.file("model")),
        "session": {**artifact.meta.get("session", {}), "threads": cfg.threads, "spinning": SPINNING},
    }
    failed = [n for n, r in results.items() if not r["gate"]["passed"]]
    if failed:
        first = results[failed[0]]["gate"]
        raise GateFailed(
            f"validate: the gate failed on {', '.join(failed)}: {'; '.join(first['failures'])}. "
            f"Likely cause: {first['cause']}. Fix: {first['fix']} (report.md has the figures)",
            metrics,
        )
    return artifact, metrics


def _measured_model(model: Path, run_dir: Path) -> dict[str, str]:
    """The file validate measures and its sha256: `edge-compress package` ships only these very bytes."""
    model, root = model.resolve(), run_dir.resolve()
    path = str(model.relative_to(root)) if model.is_relative_to(root) else str(model)
    return {"path": path, "sha256": sha256_of(model)}


def _result(  # noqa: PLR0917
    target: Target,
    run_: dict[str, Any],
    base: dict[str, Any],
    jobs: _JobFolders,
    ctx: Context,
    scoring: tuple[TaskScoring, int],
) -> dict[str, Any]:
    """One target's figures: task, agreement, consistency, latency, memory, kernels."""
    task, total = scoring
    scorer, data_name = task.score, task.data_name
    artifact, cfg = jobs.artifact, jobs.cfg
    n = len(run_["outputs"]["artifact"])
    art_out = run_["outputs"]["artifact"]
    roles = ["artifact", "reference"] if target.name == "x86_64" else ["artifact"]
    per_model: dict[str, Any] = {}
    for role in roles:
        path = artifact.file("model" if role == "artifact" else "reference")
        mem = _measure(target, jobs, role, run_["job"])
        per_model[role] = {
            "task": scorer(run_["outputs"][role], n),
            "latency_ms": summarize(run_["samples"][role], cfg.batch_size),
            "latency_samples_ms": [round(x, 4) for x in run_["samples"][role]],
            "cold_start_ms": run_["cold_start_ms"][role],
            "size_bytes": path.stat().st_size,
            "memory": mem["memory"],
            "kernels": mem["kernels"],
        }
    result: dict[str, Any] = {
        **per_model,
        "reference_task": scorer(base["outputs"]["reference"][:n], n),
        "fidelity": cosine_fidelity(art_out, base["outputs"]["reference"][:n]),
        "agreement": task.agree(art_out, base["outputs"]["reference"][:n]),
        "consistency": task.agree(art_out, base["outputs"]["artifact"][:n]),
        "setup": {
            "batch_size": cfg.batch_size,
            "sequence_length": cfg.sequence_length,
            "threads": cfg.threads,
            "warmup": cfg.warmup if target.kind == "native" else 1,
            "runs": run_["job"].runs,
            "evaluation_set": data_name,
            "evaluated_texts": n,
            "evaluation_texts": total,
            "kind": "emulated" if target.emulated else target.kind,
            "runner": target.kind,
            "cpu": target.cpu,
            "arch": target.arch,
            "thread_spinning": SPINNING,
            "onnxruntime": run_["env"]["onnxruntime"],
            "cpu_features": target.cpu_features(run_["env"].get("cpu_features", [])),
        },
    }
    if "reference" in per_model:
        ref_lat, art_lat = per_model["reference"]["latency_ms"], per_model["artifact"]["latency_ms"]
        result["speedup_p50"] = ref_lat["p50"] / art_lat["p50"]
        result["size_ratio"] = per_model["artifact"]["size_bytes"] / per_model["reference"]["size_bytes"]
    _drop(task.metric, result)
    _custom_op_kernel(artifact, target, run_["env"], result, ctx)
    if per_model["artifact"]["kernels"]["int8_total"] == 0 and artifact.meta.get("precision") == "int8":
        ctx.warn(f"validate: on {target.name} ONNX Runtime ran the int8 artifact with no int8 kernel")
    return result


# ----------------------------------------------------------------------------------------- running


class _Job:
    def __init__(self, folder: Path, texts: int, batches: int, runs: int, warmup: int, inputs: list[str]) -> None:  # noqa: PLR0917
        self.folder, self.texts, self.batches, self.runs, self.warmup = folder, texts, batches, runs, warmup
        self.inputs = inputs


class _JobFolders:
    """Self-contained job folders (models linked in, inputs as npz, the kernel library for the arch)."""

    def __init__(
        self, root: Path, artifact: Artifact, batches: list[dict[str, np.ndarray]], timing: Any, cfg: ValidateStage
    ) -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.root, self.artifact, self.batches, self.timing, self.cfg = root, artifact, batches, timing, cfg
        self.inputs = list(batches[0])
        self.native_folder: Path | None = None
        self.output_length = 0  # per-token outputs are padded to this many positions (the worker does it)

    def _make(self, target: Target, count: int, label: str) -> Path:
        folder = self.root / label.replace(":", "_").replace("/", "_")
        folder.mkdir()
        for role, key in (("artifact", "model"), ("reference", "reference")):
            _link(self.artifact.file(key), folder / f"{role}.onnx")
            data = self.artifact.file(key).with_name(self.artifact.file(key).name + ".data")
            if data.is_file():  # external weights stay beside the model under their own name
                _link(data, folder / data.name)
        arrays = {f"b{i}/{k}": v for i, b in enumerate(self.batches[:count]) for k, v in b.items()}
        np.savez(folder / "batches.npz", **arrays)  # type: ignore[arg-type]
        np.savez(folder / "timing.npz", **self.timing)
        # Without the library the ops run as their ONNX function bodies; _custom_op_kernel warns loudly.
        if self.artifact.meta.get("custom_ops") and native.available(target.arch):
            lib = native.library_path(target.arch)
            shutil.copyfile(lib, folder / lib.name)
        if target.kind == "docker":
            folder.chmod(0o777)  # the image's user writes its outputs here
        return folder

    def full(self, target: Target) -> _Job:
        folder = self._make(target, len(self.batches), target.name)
        if target.name == "x86_64":
            self.native_folder = folder
        runs = self.cfg.runs if not target.emulated else self.cfg.emulated_runs
        warmup = self.cfg.warmup if not target.emulated else 1
        texts = sum(len(next(iter(b.values()))) for b in self.batches)
        return _Job(folder, texts, len(self.batches), runs, warmup, self.inputs)

    def subset(self, target: Target, samples: int) -> _Job:
        size = len(next(iter(self.batches[0].values())))
        count = min(len(self.batches), max(1, math.ceil(samples / size)))
        folder = self._make(target, count, target.name)
        texts = sum(len(next(iter(b.values()))) for b in self.batches[:count])
        return _Job(folder, texts, count, self.cfg.emulated_runs, 1, self.inputs)

    def optimized_graph(self) -> Path:
        assert self.native_folder is not None
        return self.native_folder / "optimized_artifact.onnx"


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _job_spec(job: _Job, artifact: Artifact, cfg: ValidateStage, mode: str, roles: list[str]) -> dict[str, Any]:

    lib = None
    if artifact.meta.get("custom_ops"):
        found = [p.name for p in job.folder.glob("*.so")]
        lib = found[0] if found else None
    settings = artifact.meta.get("session", {})
    return {
        "mode": mode,
        "roles": roles,
        "models": {"artifact": "artifact.onnx", "reference": "reference.onnx"},
        "settings": {"artifact": settings, "reference": {}},
        "threads": cfg.threads,
        "inputs": list(job.inputs),
        "batches": job.batches,
        "warmup": job.warmup,
        "runs": job.runs,
        "library": lib,
    }


def _evaluate(  # noqa: PLR0917
    target: Target, jobs: _JobFolders, job: _Job, roles: list[str], timed: bool, ctx: Context
) -> dict[str, Any]:
    if not timed:
        job.runs, job.warmup = 0, 0
    spec = _job_spec(job, jobs.artifact, jobs.cfg, "evaluate", roles)
    spec["output_length"] = jobs.output_length
    with ctx.progress() as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{target.name}: {phase.replace(':', ' ')}", total=total)
            bar.update(tasks[phase], completed=done)

        env = target.run(job.folder, spec, progress)
    outputs = dict(np.load(job.folder / "outputs.npz"))
    return {
        "outputs": outputs,
        "samples": env.pop("latency_samples_ms"),
        "cold_start_ms": env.pop("cold_start_ms"),
        "env": env,
        "job": job,
    }


def _measure(target: Target, jobs: _JobFolders, role: str, job: _Job) -> dict[str, Any]:
    """Peak memory and the optimized graph's kernels, in a fresh worker process on the target."""
    spec = _job_spec(job, jobs.artifact, jobs.cfg, "memory", [role])
    spec["optimized_graph"] = True
    spec["memory_runs"] = 3 if target.kind == "native" else 1
    out = target.run(job.folder, spec)
    graph = job.folder / f"optimized_{role}.onnx"
    counted = kernels_of(graph)
    return {
        "memory": {k: out[k] for k in ("peak_rss_bytes", "runtime_baseline_rss_bytes")} | {"kind": target.kind},
        "kernels": counted["counts"],
    }


def _ready(target: Target, ctx: Context) -> None:
    problem = target.problem()
    if problem is None:
        return
    if target.kind == "docker":
        raise UserError(f"targets: {target.name}: {problem}")
    ctx.log(f"setting up target {target.name} ({problem})")
    target.setup(ctx.log)
    problem = target.problem()
    if problem:
        raise UserError(f"targets: {target.name} is still not usable after setup: {problem}")


def _custom_op_kernel(
    artifact: Artifact, target: Target, env: dict[str, Any], result: dict[str, Any], ctx: Context
) -> None:
    ops = artifact.meta.get("custom_ops") or []
    if not ops:
        return
    isa = env.get("library_isa")
    result["setup"]["custom_op_kernel"] = f"native ({isa})" if isa else "function body"
    if not isa:
        ctx.warn(
            f"validate: on {target.name} the attention ops ({', '.join(ops)}) ran as their ONNX function bodies "
            f"(no native kernel library: edge-compress build-ops --arch {target.arch}); the latency is the "
            "portable path's"
        )


# ------------------------------------------------------------------------------------ scoring, gate


def _drop(key: str, result: dict[str, Any]) -> None:
    ref, art = result["reference_task"].get(key), result["artifact"]["task"].get(key)
    ok = ref is not None and art is not None and not (math.isnan(ref) or math.isnan(art))
    result["drop"] = {"metric": key, "reference": ref, "artifact": art, "value": ref - art if ok else None}


def _gate(name: str, result: dict[str, Any], cfg: ValidateStage, artifact: Artifact, task: str) -> dict[str, Any]:
    limits = cfg.limits(name)
    gate: dict[str, Any] = {"limits": limits.model_dump() if limits else None, "failures": [], "passed": True}
    if limits is None:
        return gate
    drop, agreement = result["drop"], result["agreement"]
    if limits.max_drop is not None:
        if drop["value"] is None:
            gate["failures"].append(
                f"{drop['metric']} could not be computed on {result['setup']['evaluated_texts']} texts"
            )
        elif drop["value"] > limits.max_drop:
            gate["failures"].append(f"{drop['metric']} drop {drop['value']:.4f} > {limits.max_drop:g}")
    if limits.min_agreement is not None and agreement["value"] < limits.min_agreement:
        gate["failures"].append(f"{agreement['metric']} {agreement['value']:.4f} < {limits.min_agreement:g}")
    if gate["failures"]:
        gate["passed"] = False
        gate["cause"], gate["fix"] = diagnose(result, artifact, task)
    return gate


def diagnose(result: dict[str, Any], artifact: Artifact, task: str) -> tuple[str, str]:
    """The likely cause of a target's gate failure, and what fixes it, read from the CPU the target
    reported (its architecture, kind and features), never from its name.

    Consistency (the artifact here against the same artifact on native x86-64) tells the target's kernels
    apart from the quantization itself: if the artifact computes the same here as natively, the target is
    not at fault.
    """
    consistency = result["consistency"]["value"]
    consistent = consistency >= (0.9995 if task == "embedding" else 0.999)
    int8 = artifact.meta.get("precision") == "int8"
    types = artifact.meta.get("int8_types", {})
    preset = artifact.meta.get("preset")
    setup = result.get("setup", {})
    features = set(setup.get("cpu_features", []))
    native = setup.get("kind") == "native"
    x86_without_vnni = setup.get("arch") == "x86_64" and not features & {"avx512_vnni", "avx_vnni"}
    # u8s8 with full-range weights; u8u8 kernels widen to int16 before multiplying and do not saturate.
    u8s8_full = types.get("weight_type", "int8") == "int8" and not types.get("reduce_range", False)
    saturates = int8 and u8s8_full and x86_without_vnni
    if saturates and (consistent or native):
        # Native x86-64 without VNNI: the reference run saturates as well, so consistency cannot show it.
        return (
            f"u8s8 saturation without VNNI: this CPU has no VNNI, and AVX2's vpmaddubsw adds pairs of u8 x s8 "
            f"products in int16, which overflow with full-range 8-bit weights (preset {preset})",
            "quantize.preset: x86_64-avx2 (7-bit weights, reduce_range), or quantize.preset: auto",
        )
    if consistent or native:
        how = "quantize.goal (accuracy-aware: keeps the most sensitive layers in float) or a qat stage"
        return (
            f"the artifact itself: it computes the same here as on native x86-64 (consistency {consistency:.4f}), "
            "so the loss comes from compression, not from this CPU",
            how if int8 else "less aggressive pruning or distillation settings",
        )
    if saturates:
        return (
            f"u8s8 saturation without VNNI: AVX2's vpmaddubsw adds pairs of u8 x s8 products in int16, which "
            f"overflow with full-range 8-bit weights (preset {preset}); the same artifact here differs from "
            f"native x86-64 (consistency {consistency:.4f})",
            "quantize.preset: x86_64-avx2 (7-bit weights, reduce_range), or quantize.preset: auto with "
            "x86_64-avx2 among the targets",
        )
    if setup.get("arch") == "aarch64" and int8 and preset not in (None, "aarch64"):
        return (
            f"ONNX Runtime's aarch64 int8 kernels compute this artifact (preset {preset}) differently from x86-64 "
            f"(consistency {consistency:.4f})",
            "quantize.preset: aarch64 for an artifact that ships to ARM only, or keep the sensitive layers in "
            "float (quantize.goal)",
        )
    return (
        f"this target's kernels differ from native x86-64 on this artifact (consistency {consistency:.4f})",
        "keep the sensitive layers in float (quantize.goal) and compare the node map in report.html",
    )


# ----------------------------------------------------------------------------------- weights


def weight_sparsity(model: Path) -> list[dict[str, Any]]:
    """Share of zero weights in each weight matrix of the model's compute ops (int8 weights: q == zero point)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model)).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    rows = []
    for node in graph.node:
        if node.op_type not in FLOAT_COMPUTE_OPS | INT8_OPS | {"MatMulInteger"}:
            continue
        for given in node.input[1:3] if node.op_type != "MatMul" else node.input[1:2]:
            name, axis = given, 1
            zp: np.ndarray = np.zeros((), np.float64)
            source = producers.get(given)
            if source is not None and source.op_type == "DequantizeLinear":
                if len(source.input) > 2 and source.input[2] in inits:
                    zp = numpy_helper.to_array(inits[source.input[2]]).astype(np.float64)
                axis = next((a.i for a in source.attribute if a.name == "axis"), 1)
                name = source.input[0]
            if name not in inits:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.ndim != 2:
                continue
            if zp.ndim == 1:  # per-channel zero points along the DequantizeLinear's axis
                zp = zp.reshape(-1, 1) if axis % 2 == 0 else zp.reshape(1, -1)
            zero = (w.astype(np.float64) == zp).mean()
            rows.append({"node": node.name or name, "weight": name, "shape": list(w.shape), "zeros": float(zero)})
            break
    return rows

"""Benchmark: our int8 task models against what a user would deploy instead, on each model's test set.

    .venv/bin/python benchmarks/tasks.py bbc-news snli brown-pos [--ours bbc-news=runs/bbc-news-int8 ...]
        [--limit N]          (or `make bench-tasks`)

For each reference task model (fine-tuned by `edge-compress train recipes/train/NAME.yaml`), with its int8
artifact from `edge-compress run recipes/NAME-int8.yaml` (default run folder runs/NAME-int8), the variants:
PyTorch fp32 (the fine-tuned folder, transformers' defaults), ONNX Runtime fp32 of a plain export (no ORT
fusion) and of our fused export, ONNX Runtime's quantize_dynamic with its defaults on the plain export,
Hugging Face Optimum's quantizer with its preset for this CPU on the plain export, and our int8 artifact.
Every variant runs every test example in turn (batch 1, the text's own length up to max_length tokens,
2 threads), round-robin per example; the same outputs give the task metric, agreement with PyTorch fp32
and the latency. Writes benchmarks/results/tasks.md (also printed). Baselines go to runs/bench-tasks/NAME/.

Optimum runs in a virtual environment of its own (~/.cache/edge-compress/optimum-venv, made on first use):
optimum-onnx 0.1.0 requires transformers < 4.58 and optimum ~= 2.1.0, and the only Optimum pip resolves
next to our transformers 5.x is 1.17.1, which fails to import with it. Only its quantizer runs there
(benchmarks/optimum_quantize.py); its model is timed here with the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from compress.api import Report, load
from compress.context import Context
from compress.data.cache import write_atomic
from compress.data.spec import ReferenceSet
from compress.errors import UserError
from compress.models import hf
from compress.models.spec import HFModel, PackageModel
from compress.recipe import Recipe
from compress.runtime.evaluation import TaskScoring, pad_outputs, task_scoring
from compress.runtime.kernels import count_kernels
from compress.runtime.latency import round_robin, summarize
from compress.runtime.session import session
from compress.tasks import HEADS, TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results/tasks.md")
THREADS, WARMUP = 2, 5
TORCH, PLAIN, FUSED, DYNAMIC, OPTIMUM, OURS = (
    "PyTorch fp32",
    "ORT fp32, plain export",
    "ORT fp32, our export (fused)",
    "ORT int8, quantize_dynamic defaults",
    "ORT int8, Optimum",
    "ours int8",
)
OPTIMUM_VENV = Path.home() / ".cache" / "edge-compress" / "optimum-venv"
# What resolves beside onnxruntime 1.32 (pinned to ours below, so the quantizer code is the same release).
OPTIMUM_PINS = ("optimum==2.1.0", "optimum-onnx[onnxruntime]==0.1.0")
INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")


@dataclass
class Variant:
    call: Callable[[dict[str, np.ndarray]], np.ndarray]  # batch-1 feeds -> the model's logits
    path: Path  # the file a user ships
    settings: dict[str, Any] | None = None  # ONNX Runtime session settings; None: PyTorch
    ms: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


@dataclass
class Comparison:
    """One task model's figures: per variant label, its row (or why it is missing)."""

    name: str
    task: str
    data_name: str
    examples: int
    tokens: tuple[float, int]  # mean and max tokens per example
    rows: dict[str, dict[str, Any]]
    missing: dict[str, str]
    ours: Path


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        # Idle OpenMP threads of PyTorch must sleep, not spin: spinning, they steal the cores of the variant
        # timed next (ORT's own threads stop spinning at the end of each run below). Measured here on a loaded machine
        # (bbc-news, 128 tokens): PyTorch's median was 1193 ms unset, 33 ms with PASSIVE. libgomp reads the
        # variable when torch loads, and importing compress loads torch: start again with it set.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description="Our int8 task models against the alternatives, side by side.")
    parser.add_argument("names", nargs="+", help="reference task models (bbc-news, snli, brown-pos)")
    parser.add_argument("--ours", action="append", default=[], metavar="NAME=RUN_DIR", help="our int8 run")
    parser.add_argument("--limit", type=int, default=None, help="the first N test examples (default: all)")
    parser.add_argument("--no-optimum", action="store_true", help="leave Optimum out (no venv is made)")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 2:
        parser.error("--limit must be at least 2")
    ours = {n: Path(f"runs/{n}-int8") for n in args.names}
    for item in args.ours:
        name, sep, run_dir = item.partition("=")
        if not sep or name not in ours:
            parser.error(f"--ours {item}: expected NAME=RUN_DIR with NAME one of {', '.join(args.names)}")
        ours[name] = Path(run_dir)
    unfinished = [f"{ours[n]} (edge-compress run recipes/{n}-int8.yaml)" for n in args.names if not _finished(ours[n])]
    if unfinished:
        parser.error(f"no finished int8 run: {', '.join(unfinished)}; or name one with --ours NAME=RUN_DIR")
    command = shlex.join([shown(Path(sys.executable)), *sys.argv])
    os.chdir(ROOT)  # run folders and the results path are relative to the repository
    quantizer = None if args.no_optimum else optimum_quantizer()
    import torch

    torch.set_num_threads(THREADS)

    results = []
    for name in args.names:
        log(f"{name}: {ours[name]}")
        try:
            results.append(compare(ours[name], args.limit, Path("runs/bench-tasks") / name, quantizer))
        except UserError as exc:
            sys.exit(f"{name}: {exc}")
    report = "\n".join([*header(command, quantizer, args.limit), *(line for c in results for line in render(c))])
    write_atomic(RESULTS, report.encode())
    print(report)
    log(f"written: {RESULTS}")


# ------------------------------------------------------------------------------------------- variants


def on_test_split(recipe: Recipe) -> Recipe:
    """The recipe, scoring the held-out test set: data.test when it names one, else the test split of the split
    reference set it evaluates on (snli-int8 chooses its float nodes on the validation split)."""
    data = recipe.data
    test = data.test
    if test is None and isinstance(data.evaluation, ReferenceSet) and data.evaluation.split not in (None, "test"):
        test = data.evaluation.model_copy(update={"split": "test", "limit": None})
    if test is None:
        return recipe
    return recipe.model_copy(update={"data": data.model_copy(update={"evaluation": test})})


def compare(run_dir: Path, limit: int | None, work: Path, quantizer: OptimumQuantizer | None) -> Comparison:
    """Build every variant of one task model, run them on its test examples and score them."""
    report = Report.read(run_dir)
    recipe = on_test_split(load(run_dir / "resolved_recipe.yaml"))
    ctx = Context(recipe=recipe, run_dir=run_dir)
    int8, fused = report.stage_artifact("quantize"), report.stage_artifact("export")
    if not isinstance(recipe.model, HFModel | PackageModel):
        raise UserError(f"{run_dir}: the recipe's model is not a Hugging Face checkpoint")
    folder = hf.model_folder(recipe.model)
    max_length = int8.usable_length(recipe.data.max_length)
    examples = ctx.examples("evaluation")[:limit]
    scoring = task_scoring(ctx, int8, max_length)

    feeds, variants, plain = baseline_variants(ctx, folder, examples, max_length, work)
    variants[FUSED] = ort_variant(fused.file("model"), {})
    missing: dict[str, str] = {}
    if quantizer is None:
        missing[OPTIMUM] = "left out (--no-optimum)"
    elif quantizer.python is None:
        missing[OPTIMUM] = f"not installed: {quantizer.problem}"
    else:
        made = quantizer.quantize(plain, work / "optimum")
        if isinstance(made, str):
            missing[OPTIMUM] = made
        else:
            variants[OPTIMUM] = ort_variant(made, {})
    variants[OURS] = ort_variant(int8.file("model"), dict(int8.meta.get("session") or {}))

    run_interleaved(variants, feeds)
    lengths = [int(f["attention_mask"].sum()) for f in feeds]
    return Comparison(
        name=recipe.name.removesuffix("-int8"),
        task=ctx.task,
        data_name=scoring.data_name,
        examples=len(feeds),
        tokens=(float(np.mean(lengths)), max(lengths)),
        rows=score_variants(variants, scoring),
        missing=missing,
        ours=run_dir,
    )


def baseline_variants(
    ctx: Context, folder: Path, examples: list[Any], max_length: int, work: Path
) -> tuple[list[dict[str, np.ndarray]], dict[str, Variant], Path]:
    """The fine-tuned model's batch-1 feeds, and the variants a user has without us: PyTorch fp32, ORT fp32 of
    a plain export, quantize_dynamic's defaults on it (plus the plain export's path)."""
    import torch

    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, hf.read_config(folder))
    feeds = [hf.encode(tokenizer, [ex], max_length, names, kind=ctx.input_kind) for ex in examples]
    module = TASKS[ctx.task].build_module(default_model(folder, HEADS[ctx.task]), ctx.recipe.model, names)
    sample = hf.encode(tokenizer, examples[:2], max_length, names, kind=ctx.input_kind)
    plain, dynamic = plain_baselines(module, sample, feeds, work, per_token=ctx.input_kind == "words")

    def torch_call(f: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = module(*(torch.from_numpy(f[n]) for n in names)).numpy()
        return out

    variants = {TORCH: Variant(torch_call, folder / "model.safetensors"), PLAIN: ort_variant(plain, {})}
    variants[DYNAMIC] = ort_variant(dynamic, {})
    return feeds, variants, plain


def default_model(folder: Path, head: str | None) -> Any:
    """The fine-tuned model as transformers loads it by default (its default attention, not ours: eager)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return hf.auto_class(head).from_pretrained(folder, local_files_only=True, trust_remote_code=False).eval()


def plain_baselines(
    module: Any, sample: dict[str, np.ndarray], feeds: list[dict[str, np.ndarray]], work: Path, per_token: bool
) -> tuple[Path, Path]:
    """What a user gets without us: a plain export, checked against PyTorch, and quantize_dynamic's defaults.

    The plain export is torch.onnx.export's TorchScript exporter at opset 17 without ONNX Runtime's offline
    fusion (the graph of benchmarks/minilm_int8.py; Optimum's own exporter also passes dynamo=False)."""
    from onnxruntime.quantization import quantize_dynamic

    from exporters.onnx_export import check_against_torch, export

    (work / "plain").mkdir(parents=True, exist_ok=True)
    plain, dynamic = work / "plain" / "model.onnx", work / "quantize_dynamic.onnx"
    log(f"  plain export -> {plain}")
    outputs = ("logits",)
    export(
        module, example=sample, path=plain, output_names=outputs, exporter="torchscript", opset=17, per_token=per_token
    )
    agreement = check_against_torch(module, plain, [sample, *feeds[:4]], tolerance=1e-4)
    log(f"  plain export matches PyTorch: max |diff| {agreement.max_abs_diff:.1e}")
    log(f"  quantize_dynamic (defaults) -> {dynamic}")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice to the root logger
    try:
        quantize_dynamic(plain, dynamic)
    finally:
        root.setLevel(level)
    return plain, dynamic


def ort_variant(path: Path, settings: dict[str, Any]) -> Variant:
    sess = session(path, THREADS, settings, idle_spinning=False)

    def call(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(sess.run(None, feeds)[0])

    return Variant(call, path, settings)


def run_interleaved(variants: dict[str, Variant], feeds: list[dict[str, np.ndarray]]) -> None:
    """Each example through every variant in turn (the order rotates per example), each call timed."""
    log(f"  timing: {len(feeds)} examples x {len(variants)} variants, round-robin")
    started = time.monotonic()

    def progress(i: int) -> None:
        if (i + 1) % 200 == 0:
            log(f"  {i + 1}/{len(feeds)} examples, {time.monotonic() - started:.0f} s")

    calls = {label: v.call for label, v in variants.items()}
    ms, outputs = round_robin(calls, dict.fromkeys(variants, feeds), WARMUP, progress)
    for label, v in variants.items():
        v.ms.extend(ms[label])
        v.outputs.extend(outputs[label])


def score_variants(variants: dict[str, Variant], scoring: TaskScoring) -> dict[str, dict[str, Any]]:
    """Per variant: the task metric, agreement with PyTorch fp32, latency, size and kernels."""
    outputs = {label: pad_outputs(v.outputs) for label, v in variants.items()}
    reference = outputs[TORCH]
    rows = {}
    for label, v in variants.items():
        n = len(outputs[label])
        rows[label] = {
            "task": scoring.score(outputs[label], n),
            "agreement": scoring.agree(outputs[label], reference),
            "latency": summarize(v.ms),
            "size_bytes": sum(p.stat().st_size for p in (v.path, Path(f"{v.path}.data")) if p.is_file()),
            "kernels": None if v.settings is None else count_kernels(v.path, v.settings),
            "path": str(v.path),
        }
    return rows


# -------------------------------------------------------------------------------------------- Optimum


@dataclass
class OptimumQuantizer:
    """Optimum's quantizer in its own virtual environment; python None: it could not be installed."""

    python: Path | None
    preset: str
    problem: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # the last quantization's settings and versions

    def quantize(self, model: Path, out_dir: Path) -> Path | str:
        """The quantized model, or why there is none."""
        script = ROOT / "benchmarks" / "optimum_quantize.py"
        log(f"  Optimum ({self.preset}, dynamic) -> {out_dir}")
        cmd = [str(self.python), str(script), str(model.resolve()), str(out_dir.resolve()), self.preset]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            return f"its quantizer failed: {_last_line(done.stderr)}"
        self.info = json.loads(done.stdout.strip().splitlines()[-1])
        return Path(self.info["model"])


def optimum_quantizer() -> OptimumQuantizer:
    """Optimum's quantizer, its virtual environment made on first use (torch pinned first: an unpinned
    torch pulls several GB of CUDA wheels)."""
    import onnxruntime

    preset = optimum_preset()
    pins = [*OPTIMUM_PINS, f"onnxruntime=={onnxruntime.__version__}"]
    python, stamp = OPTIMUM_VENV / "bin" / "python", OPTIMUM_VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == "\n".join(pins):
        return OptimumQuantizer(python, preset)
    log(f"making Optimum's virtual environment: {OPTIMUM_VENV} ({', '.join(pins)})")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(OPTIMUM_VENV)],
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [str(python), "-m", "pip", "install", "-q", *pins],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            return OptimumQuantizer(None, preset, f"`{shlex.join(step[2:])}`: {_last_line(done.stderr)}")
    stamp.write_text("\n".join(pins))
    return OptimumQuantizer(python, preset)


def optimum_preset() -> str:
    """Optimum's AutoQuantizationConfig preset for this CPU, by its flags."""
    if platform.machine() in {"aarch64", "arm64"}:
        return "arm64"
    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def cpu_flags() -> set[str]:
    text = _lscpu()
    line = next((ln for ln in text.splitlines() if ln.startswith("Flags:")), "Flags:")
    return set(line.split(":", 1)[1].split())


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:300] if lines else "no message"


# ------------------------------------------------------------------------------------------- markdown


def header(command: str, quantizer: OptimumQuantizer | None, limit: int | None) -> list[str]:
    import onnxruntime
    import torch
    import transformers

    lscpu = _lscpu()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    flags = sorted(f for f in cpu_flags() if f in INT8_FLAGS)
    lines = [
        "# Benchmark: task models, our int8 against the alternatives",
        "",
        f"- CPU (lscpu): {model}, {os.cpu_count()} logical cores ({platform.machine()}); int8-relevant flags: "
        f"{' '.join(flags) or 'none'}",
        f"- Versions: torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Setup: batch 1, each test example at its own length (up to the recipe's max_length, no padding), "
        f"{THREADS} threads (ONNX Runtime intra-op, spinning during runs only; torch.set_num_threads({THREADS}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}); {WARMUP} warm-up calls per variant, then "
        "every example through every variant in turn (the order rotating per example). Latency: the per-example "
        "times' median and p90; the speed-up is the ratio of medians."
        + (f" Only the first {limit} test examples." if limit else " The whole test set."),
        "- Metric: accuracy (a tagger's: token accuracy at each word's first sub-token) with a bootstrap 95% "
        "interval over examples (sentences for the tagger), scored by compress.runtime.evaluation. Agreement: "
        "equal predictions with PyTorch fp32 (per word for the tagger).",
        "- Plain export: torch.onnx.export (TorchScript exporter, opset 17) of the model as transformers loads "
        "it by default, no ONNX Runtime offline fusion; checked against PyTorch (1e-4). quantize_dynamic: "
        "`quantize_dynamic(plain, out)` with every default.",
    ]
    lines.append(_optimum_line(quantizer))
    return [*lines, ""]


def _optimum_line(quantizer: OptimumQuantizer | None) -> str:
    if quantizer is None:
        return "- Optimum: left out (--no-optimum)."
    if quantizer.python is None:
        return f"- Optimum: could not be installed in its own environment: {quantizer.problem}"
    info = quantizer.info
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    return (
        f"- Optimum: `ORTQuantizer` with `AutoQuantizationConfig.{quantizer.preset}(is_static=False)` (preset by "
        f"this CPU's flags; {info.get('config', '?')}, reduce_range {info.get('reduce_range')}, operators "
        f"{', '.join(info.get('operators', []))}) on the plain export, in its own venv ({OPTIMUM_VENV}: "
        f"{versions}): optimum-onnx 0.1.0 requires transformers < 4.58, and the only Optimum pip resolves beside "
        "transformers 5.x (1.17.1) fails on import (`cannot import name 'is_tf_available' from "
        "'transformers.utils'`). Its model is timed here with the others."
    )


def render(c: Comparison) -> list[str]:
    metric = "token accuracy" if c.task == "token-classification" else "accuracy"
    agree = "words" if c.task == "token-classification" else "predictions"
    plain = c.rows[PLAIN]
    plain_p50, plain_mb = plain["latency"]["p50"], plain["size_bytes"] / 1e6
    lines = [
        f"## {c.name} ({c.task}): {c.data_name}, {c.examples} examples, "
        f"{c.tokens[0]:.1f} tokens on average (longest {c.tokens[1]})",
        "",
        f"| variant | {metric} [95% CI] | {agree} equal to PyTorch fp32 | p50 ms | p90 ms "
        "| × vs ORT fp32 plain | size MB | % of fp32 ONNX | int8 / float kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in (TORCH, PLAIN, FUSED, DYNAMIC, OPTIMUM, OURS):
        if label in c.missing:
            lines.append(f"| {label} | {c.missing[label]} |  |  |  |  |  |  |  |")
            continue
        row = c.rows[label]
        task, lat, k = row["task"], row["latency"], row["kernels"]
        lo, hi = task["accuracy_ci95"]
        mb = row["size_bytes"] / 1e6
        lines.append(
            f"| {label} | {100 * task['accuracy']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] "
            f"| {100 * row['agreement']['value']:.2f}% ({row['agreement'].get('differing', 0)} differ) "
            f"| {lat['p50']:.2f} | {lat['p90']:.2f} | {plain_p50 / lat['p50']:.2f}× | {mb:.1f} "
            f"| {100 * mb / plain_mb:.0f}% | " + (f"{k['int8_total']} / {k['float_total']} |" if k else "— |")
        )
    return [*lines, "", *targets(c, metric), ""]


def targets(c: Comparison, metric: str) -> list[str]:
    """The issue's targets for our int8 artifact, pass or miss, with the measured figures."""
    ours, fp32, dyn = c.rows[OURS], c.rows[TORCH], c.rows[DYNAMIC]
    acc, ref, dyn_acc = ours["task"]["accuracy"], fp32["task"]["accuracy"], dyn["task"]["accuracy"]
    lo, hi = ours["task"]["accuracy_ci95"]
    rlo, rhi = fp32["task"]["accuracy_ci95"]
    drop = 100 * (ref - acc)
    agreement = ours["agreement"]["value"]
    speedup = c.rows[PLAIN]["latency"]["p50"] / ours["latency"]["p50"]
    checks = [
        (
            f"int8 {metric} within 0.3 points of fp32 (at most 0.3 below)",
            drop <= 0.3,
            f"{100 * acc:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] vs fp32 {100 * ref:.2f} [{100 * rlo:.2f}, "
            f"{100 * rhi:.2f}]: {100 * (acc - ref):+.2f} points",
        ),
        (f"agreement with fp32 ≥ 99% ({ours['agreement']['metric']})", agreement >= 0.99, f"{100 * agreement:.2f}%"),
        ("≥ 1.6× faster than ORT fp32 of the plain export (p50)", speedup >= 1.6, f"{speedup:.2f}×"),
        (
            f"never behind quantize_dynamic on {metric}",
            acc >= dyn_acc,
            f"{100 * acc:.2f} vs {100 * dyn_acc:.2f}: {100 * (acc - dyn_acc):+.2f} points",
        ),
    ]
    lines = [f"- **{'pass' if ok else 'MISS'}**: {name} (measured {value})" for name, ok, value in checks]
    n = c.examples
    note = (
        f"- With {n} examples one example is {100 / n:.2f} points of accuracy: read the 0.3-point target "
        "against the intervals."
        if c.task == "classification"
        else f"- The interval is over {n} sentences; read the 0.3-point target against it."
    )
    return [f"### Targets ({OURS}: {c.ours})", "", *lines, note]


def _finished(run_dir: Path) -> bool:
    return (run_dir / "report.json").is_file() and (run_dir / "resolved_recipe.yaml").is_file()


def shown(path: Path) -> str:
    """The interpreter as the user would type it: relative to the current folder when inside it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

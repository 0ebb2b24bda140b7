"""Validation targets (native, qemu x86-64 AVX2, qemu aarch64 with and without dot product), the gate, the report.

Each emulated target runs the real onnxruntime (x86-64 under qemu-x86_64 -cpu Haswell, the aarch64 wheel
under qemu-aarch64) on a tiny model; `make setup` installs the host tools and the arm64 userland.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from compress import targets
from compress.context import Context
from compress.errors import GateFailed
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime.presets import host_has_vnni

EMULATED = ["x86_64-avx2", "aarch64", "aarch64-neon"]
CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def _emulation_missing() -> str | None:
    for name in EMULATED:
        problem = targets.get(name).problem()
        if problem and (os.geteuid() != 0 or shutil.which("qemu-aarch64-static") is None):
            return f"{name}: {problem}"
    return None


needs_emulation = pytest.mark.skipif(_emulation_missing() is not None, reason=str(_emulation_missing()))


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    ctx = Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True))
    return run(recipe, ctx)


@pytest.fixture(scope="module")
def saturating_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with every encoder weight at +-0.05, one sign per output row.

    Per-channel int8 puts every weight at +-127, so on AVX2 without VNNI the u8s8 kernels' int16 pair sums
    (vpmaddubsw) saturate wherever two neighbouring activations are large: the case the gate must catch.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tests.conftest import TEXTS

    folder = tmp_path_factory.mktemp("saturating-bert")
    words = sorted({w for t in TEXTS for w in re.findall(r"[a-z]+", t)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)  # not vocab_file: ignored
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                sign = torch.where(torch.rand(module.out_features, 1) < 0.5, -1.0, 1.0)
                module.weight.copy_(0.05 * sign.expand_as(module.weight))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _stages(preset: str, gate: dict | None = None) -> list[dict]:
    validate: dict = {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32, "emulated_runs": 2}
    if gate is not None:
        validate["gate"] = gate
    return [{"type": "export"}, {"type": "quantize", "mode": "dynamic", "preset": preset}, validate]


@needs_emulation
def test_every_target_runs_the_artifact_and_matches_native(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=_stages("auto"), targets=["x86_64", *EMULATED])
    report = json.loads((_run(path) / "report.json").read_text())
    found = report["targets"]
    assert list(found) == ["x86_64", *EMULATED]
    for name in EMULATED:
        t = found[name]
        assert t["setup"]["kind"] == "emulated" and "reference" not in t  # no fp32 timing to compare with
        # The same int8 artifact computes the same embeddings as natively (preset auto: 7-bit weights).
        assert t["consistency"]["value"] > 0.99999, name
        assert t["agreement"]["value"] > 0.99
        assert t["setup"]["evaluated_texts"] == found["x86_64"]["setup"]["evaluated_texts"]  # 12 texts < 64
        assert t["artifact"]["latency_ms"]["runs"] == 2
        assert t["artifact"]["kernels"]["int8_total"] > 0
        assert t["artifact"]["memory"]["peak_rss_bytes"] > 10_000_000
        assert t["artifact"]["cold_start_ms"] > 0
    assert found["x86_64-avx2"]["setup"]["arch"] == "x86_64"
    assert "avx512f" not in found["x86_64-avx2"]["setup"]["cpu_features"]
    assert "asimddp" in found["aarch64"]["setup"]["cpu_features"]
    assert "asimddp" not in found["aarch64-neon"]["setup"]["cpu_features"]
    assert {found[n]["setup"]["onnxruntime"] for n in found} == {found["x86_64"]["setup"]["onnxruntime"]}
    native = found["x86_64"]
    assert native["reference"]["latency_ms"]["runs"] == 10 and native["speedup_p50"] > 0
    assert len(native["artifact"]["latency_samples_ms"]) == 10
    md = (path.parent / "runs" / "tiny" / "report.md").read_text()
    assert "EMULATED, not comparable with native" in md
    assert "## Provenance" in md and "recipe (resolved) sha256" in md


@needs_emulation
def test_gate_fails_on_u8s8_saturation_without_vnni_and_names_the_fix(
    recipe_for: Callable[..., Path], saturating_bert: Path
) -> None:
    gate = {"default": {"min_agreement": 0.999}}
    path = recipe_for(
        stages=_stages("x86_64-vnni", gate), targets=["x86_64", "x86_64-avx2"], model={"hf": str(saturating_bert)}
    )
    # On a VNNI host only the AVX2 target saturates; on a host without VNNI the native run saturates too,
    # so consistency cannot tell, and the diagnosis comes from the CPU's flags.
    vnni = host_has_vnni()
    run_dir = path.parent / "runs" / "tiny"
    try:
        _run(path)
    except GateFailed as failed:
        message = str(failed)
    else:
        figures = {
            n: t["agreement"]["value"] for n, t in json.loads((run_dir / "report.json").read_text())["targets"].items()
        }
        if vnni:
            raise AssertionError(f"the AVX2 target did not saturate: {figures}")
        # Measured on an AMD EPYC (first Zen generation, 2026-12-04): neither the native run nor the emulated
        # AVX2 target saturated (agreement 0.99999 both), so there is no failure here to diagnose.
        pytest.skip(f"this CPU's int8 kernels did not saturate on the saturating model (agreement {figures})")
    assert re.search(f"the gate failed on {'' if vnni else 'x86_64, '}x86_64-avx2", message), message
    assert "quantize.preset: x86_64-avx2" in message
    report = json.loads((run_dir / "report.json").read_text())
    native, avx2 = report["targets"]["x86_64"], report["targets"]["x86_64-avx2"]
    assert native["consistency"]["value"] == pytest.approx(1.0)
    if vnni:
        assert native["gate"]["passed"]
        assert avx2["consistency"]["value"] < 0.999  # the same artifact computes differently without VNNI
    else:
        assert not native["gate"]["passed"] and "saturation" in native["gate"]["cause"]
    assert not avx2["gate"]["passed"]
    assert "saturation" in avx2["gate"]["cause"] and "x86_64-avx2" in avx2["gate"]["fix"]
    assert "FAILED" in (run_dir / "report.md").read_text()
    assert (run_dir / "03_validate" / "metrics.json").is_file() and not (run_dir / "03_validate" / "done").exists()

    # The fix the report names: preset auto picks 7-bit weights for an AVX2 target, and the gate passes.
    fixed = recipe_for(
        stages=_stages("auto", gate), targets=["x86_64", "x86_64-avx2"], model={"hf": str(saturating_bert)}
    )
    report = json.loads((_run(fixed) / "report.json").read_text())
    assert all(t["gate"]["passed"] for t in report["targets"].values())
    assert report["targets"]["x86_64-avx2"]["consistency"]["value"] > 0.99999


def test_gate_blames_the_artifact_when_it_fails_natively(recipe_for: Callable[..., Path]) -> None:
    """An impossible agreement limit fails on native x86-64: the cause is the compression, not the CPU."""
    path = recipe_for(stages=_stages("auto", {"x86_64": {"min_agreement": 1.0, "max_drop": 0.0}}))
    with pytest.raises(GateFailed) as caught:
        _run(path)
    gate = json.loads((path.parent / "runs" / "tiny" / "report.json").read_text())["targets"]["x86_64"]["gate"]
    assert not gate["passed"] and "the artifact itself" in gate["cause"]
    assert "quantize.goal" in gate["fix"] and "x86_64" in str(caught.value)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (make setup installs chromium-headless-shell)")
def test_report_html_rerenders_and_its_plots_decode_in_headless_chromium(recipe_for: Callable[..., Path]) -> None:
    run_dir = _run(recipe_for())
    (run_dir / "report.html").unlink()
    (run_dir / "report.md").unlink()
    cli = [sys.executable, "-m", "compress.cli", "report", str(run_dir)]
    proc = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    page = (run_dir / "report.html").read_text()
    assert (run_dir / "report.md").is_file()
    assert page.count("data:image/png;base64,") == 4  # latency, front, sparsity, node map
    assert "Provenance" in page and "onnxruntime" in page and "recipe (resolved) sha256" in page
    assert CHROMIUM is not None
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    ).stdout
    assert 'data-plots-decoded="4"' in dom  # every embedded plot decoded to a real image


def test_report_of_a_folder_without_report_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "report", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no report.json" in proc.stderr


@pytest.mark.parametrize(
    ("targets_", "stages", "message"),
    [
        (["x86_64", "arm"], None, "unknown target 'arm'"),
        (["x86_64", "x86_64"], None, "each target once"),
        (
            ["x86_64"],
            [{"type": "export"}, {"type": "validate", "gate": {"aarch64": {"max_drop": 0.01}}}],
            "validate.gate",
        ),
    ],
)
def test_bad_targets_are_one_line_errors(
    recipe_for: Callable[..., Path], targets_: list[str], stages: list | None, message: str
) -> None:
    path = recipe_for(targets=targets_, stages=stages)
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1


def test_target_setup_without_network_is_a_one_line_error(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("the arm64 userland is built as root with mmdebstrap")
    bad = "http://127.0.0.1:9"
    env = dict(os.environ, EDGE_COMPRESS_ARM64_ROOT=str(tmp_path / "arm64"), http_proxy=bad, https_proxy=bad)
    env |= {"HTTP_PROXY": bad, "HTTPS_PROXY": bad, "PIP_INDEX_URL": f"{bad}/simple"}
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "targets", "setup", "aarch64"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "aarch64 setup:" in proc.stderr and "failed" in proc.stderr


def test_docker_target_without_the_image_is_a_clear_error() -> None:
    problem = targets.get("docker:edge-compress/does-not-exist:1").problem()
    assert problem is not None and "edge-compress/does-not-exist:1" in problem


def test_native_probe_runs_with_a_relative_job_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run directories are often relative (output.dir: runs): the worker must still find its files."""
    monkeypatch.chdir(tmp_path)
    Path("runs/job").mkdir(parents=True)
    result = targets.get("x86_64").run(Path("runs/job"), {"mode": "probe", "threads": 1})
    assert result["machine"] == "x86_64" and result["onnxruntime"]
    assert "avx2" in result["cpu_features"]


def test_installing_host_tools_is_announced_before_apt_get_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_tools changes the host: one line naming the packages, before any apt-get (recorded here, not run)."""
    from compress.container import host_tools

    installed: set[str] = set()
    events: list[str] = []

    def which(tool: str) -> str | None:
        return f"/usr/bin/{tool}" if tool == "apt-get" or tool in installed else None

    def run(cmd: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        events.append("run: " + " ".join(cmd))
        if "install" in cmd:
            installed.update(["mmdebstrap", "qemu-aarch64-static"])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(host_tools.shutil, "which", which)
    monkeypatch.setattr(host_tools.subprocess, "run", run)
    monkeypatch.setattr(host_tools.os, "geteuid", lambda: 0)
    host_tools.ensure_tools(["qemu-aarch64-static", "mmdebstrap"], lambda msg: events.append("log: " + msg))
    assert events[0] == (
        "log: installing Debian packages mmdebstrap qemu-user-static on this host for qemu-aarch64-static, "
        "mmdebstrap (apt-get update, then apt-get install --no-install-recommends, as root)"
    )
    assert [e.split()[1] for e in events[1:]] == ["apt-get", "apt-get"] and "update" in events[1]
    assert events[2].endswith("--no-install-recommends mmdebstrap qemu-user-static")
    events.clear()
    host_tools.ensure_tools(["mmdebstrap"], lambda msg: events.append("log: " + msg))
    assert events == []  # present: nothing said, nothing run


def test_the_cpu_is_named_with_its_family_and_model_on_x86() -> None:
    """A virtual machine's "AMD EPYC" alone hides whether int8 has VNNI: reports and benchmarks name the family."""
    import platform
    import re

    from compress.targets.native import cpu_model

    if platform.machine() != "x86_64":
        pytest.skip("x86 family and model numbers")
    assert re.search(r"\S \(family \d+, model \d+\)$", cpu_model()), cpu_model()

"""One bundle, one int8 model per CPU family: packaged from runs validated on each family, picked by the server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import compress
from compress.errors import UserError
from compress.runtime.presets import host_has_vnni
from compress.serving.bundle_check import VARIANT_FILES, BundleError, host_family, load_metadata
from compress.serving.variants import write_variant_bundle
from tests.test_serving import SERVER, Client, _run, free_port, start_server
from tests.test_targets import needs_emulation

HOST = "x86_64-vnni" if host_has_vnni() else "x86_64-avx2"
OTHER_X86 = "x86_64-avx2" if HOST == "x86_64-vnni" else "x86_64-vnni"


def _stages(preset: str = "auto") -> list[dict]:
    return [
        {"type": "export"},
        {"type": "quantize", "mode": "dynamic", "preset": preset, "tune": {"runs": 3}},
        {"type": "validate", "runs": 10, "warmup": 2, "sequence_length": 16},
    ]


def _refused(bundle: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SERVER), "--model", str(bundle), "--port", str(free_port()), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_host_family_reads_the_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n")
    assert host_family(info, "x86_64") == ("x86_64-vnni", "x86_64 with avx512_vnni")
    info.write_text("flags : fpu sse2 avx2 avx_vnni\n")
    assert host_family(info, "x86_64")[0] == "x86_64-vnni"
    info.write_text("flags : fpu sse2 avx2 fma\n")
    assert host_family(info, "x86_64") == ("x86_64-avx2", "x86_64 with no VNNI flag")
    info.write_text("Features : fp asimd asimddp i8mm\n")
    assert host_family(info, "aarch64") == ("aarch64", "aarch64 with asimddp i8mm")


def test_one_variant_bundle_serves_its_family_and_refuses_others(
    recipe_for: Callable[..., Path], tmp_path: Path
) -> None:
    run_dir = _run(recipe_for(stages=_stages()))
    bundle = tmp_path / "bundle"
    meta = write_variant_bundle([run_dir], bundle)
    assert list(meta["variants"]) == [HOST] and meta["version"] == 4
    assert sorted(p.name for p in bundle.iterdir()) == ["metadata.json", VARIANT_FILES[HOST], "tokenizer"]
    assert meta["variants"][HOST]["validated_on"] == ["x86_64"]
    assert load_metadata(bundle)["variants"][HOST]["sha256"] == meta["variants"][HOST]["sha256"]

    port = free_port()
    proc = start_server(bundle, port)
    try:
        client = Client(port)
        status, served = client.request("GET", "/metadata")
        assert status == 200 and served["variant"]["family"] == HOST
        assert served["variant"]["file"] == VARIANT_FILES[HOST] and "with" in served["variant"]["chosen_by"]
        status, answer = client.predict({"texts": ["the cat sat on the mat"]})
        assert status == 200 and np.isfinite(np.asarray(answer["embeddings"])).all()
        assert served["variant"]["sha256"] == meta["variants"][HOST]["sha256"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # A CPU family that no run was validated on: the server does not start.
    line = _refused(bundle, "--cpu-family", "aarch64")
    assert "this CPU is aarch64" in line and f"validated on {HOST} only" in line
    # The Python loader is the server's model: the same pick, the same refusal.
    loaded = compress.load_bundle(bundle, threads=1)
    assert loaded.variant["family"] == HOST
    np.testing.assert_allclose(
        loaded.predict(["the cat sat on the mat"])["embeddings"], answer["embeddings"], atol=1e-5
    )
    with pytest.raises(UserError, match="this CPU is aarch64"):
        compress.load_bundle(bundle, cpu_family="aarch64")


def test_variant_file_with_another_hash_is_refused(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = _run(recipe_for(stages=_stages()))
    bundle = tmp_path / "bundle"
    write_variant_bundle([run_dir], bundle)
    path = bundle / VARIANT_FILES[HOST]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="is not the packaged"):
        load_metadata(bundle)
    assert VARIANT_FILES[HOST] in _refused(bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["variants"][HOST]["sha256"] = "0" * 64
    (bundle / "metadata.json").write_text(json.dumps(meta))
    assert "sha256 is not the one files lists" in _refused(bundle)


def test_a_run_not_validated_on_its_presets_family_is_refused(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    # The other x86 family's preset, validated on this CPU only: nothing validated it on its family.
    run_dir = _run(recipe_for(stages=_stages(OTHER_X86)))
    with pytest.raises(UserError, match=f"its int8 preset is {OTHER_X86} but no {OTHER_X86} target passed"):
        write_variant_bundle([run_dir], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_variants_must_be_one_model(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    first = _run(recipe_for(name="a", stages=_stages()))
    data = json.loads(json.dumps(load_recipe_data(recipe_for)))
    data["max_length"] = 24
    second = _run(recipe_for(name="b", stages=_stages(), data=data))
    with pytest.raises(UserError, match="its max_length differs from the first run's"):
        write_variant_bundle([first, second], tmp_path / "bundle")
    with pytest.raises(UserError, match="a second"):
        write_variant_bundle([first, first], tmp_path / "bundle")


def load_recipe_data(recipe_for: Callable[..., Path]) -> dict:
    import yaml

    return dict(yaml.safe_load(recipe_for(name="probe").read_text())["data"])


@needs_emulation
def test_two_families_in_one_bundle_from_the_cli(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    from tests.test_cli import cli

    native = _run(recipe_for(name="native", stages=_stages()))
    arm = _run(recipe_for(name="arm", stages=_stages(), targets=["aarch64"]))
    bundle = tmp_path / "bundle"
    result = cli("package", str(native), "--variant", str(arm), "--out", str(bundle))
    assert result.returncode == 0, result.stderr
    assert f"int8 variants: {HOST}" in result.stdout
    meta = load_metadata(bundle)
    assert set(meta["variants"]) == {HOST, "aarch64"}
    assert meta["variants"]["aarch64"]["validated_on"] == ["aarch64"]
    assert (bundle / "model_qint8_arm64.onnx").is_file() and not (bundle / "model.onnx").exists()
    port = free_port()
    proc = start_server(bundle, port, "--cpu-family", "aarch64")
    try:
        status, served = Client(port).request("GET", "/metadata")
        assert status == 200 and served["variant"]["family"] == "aarch64"
        assert served["variant"]["sha256"] == meta["variants"]["aarch64"]["sha256"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)

"""The runtime images for real (marked docker): a private Docker engine, amd64 and arm64 images, served predictions.

The engine is started with `edge-compress docker start` semantics (own socket, data root and PID) and
stopped at the end; the host's networking must be what it was before. arm64 containers run under
qemu-aarch64 through binfmt_misc. Needs root (Debian's docker.io, mmdebstrap and binfmt are set up here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from compress.container import images
from compress.container.engine import CLIENT, Engine, host_network
from tests.test_serving import Client, _run, free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Docker engine needs root"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    before = host_network()
    eng = Engine(images.build_root() / "engine")
    eng.start(lambda _msg: None)
    yield eng.env()
    eng.stop()
    assert eng.pid() is None
    assert host_network() == before  # forwarding, links and iptables rules as they were


def docker(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, *args], env=env, capture_output=True, text=True, check=check, timeout=600)


def serve(env: dict[str, str], image: str, arch: str) -> tuple[str, int, float]:
    """Start `image` on a free loopback port; returns the container, the port and seconds to the first answer."""
    port = free_port()
    start = time.perf_counter()
    cid = docker(
        env, "run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}", *images.run_flags(arch), image
    ).stdout.strip()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if Client(port).request("GET", "/healthz")[0] == 200:
                return cid, port, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    logs = docker(env, "logs", cid, check=False)
    docker(env, "rm", "-f", cid, check=False)
    raise AssertionError(f"{image} did not answer in 120 s: {logs.stdout[-500:]} {logs.stderr[-500:]}")


def stop(env: dict[str, str], cid: str) -> None:
    """docker stop sends SIGTERM: the server (PID 1) must exit on it, well before the 20 s kill."""
    start = time.perf_counter()
    docker(env, "stop", "-t", "20", cid)
    assert time.perf_counter() - start < 15


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipe on the real all-MiniLM-L6-v2 (int8), validated on this CPU."""
    out = tmp_path_factory.mktemp("minilm")
    spec = yaml.safe_load((REPO / "recipes" / "minilm-int8.yaml").read_text())
    spec["output"] = {"dir": str(out)}
    spec["stages"][-1]["runs"] = 10
    path = out / "minilm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return _run(path)


def _user_and_torch(env: dict[str, str], image: str, arch: str) -> tuple[str, int]:
    user = docker(env, "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
    probe = docker(env, "run", "--rm", "--network", "none", *images.run_flags(arch), "--entrypoint", "python3", image,
                   "-c", "import torch", check=False)  # fmt: skip
    return user, probe.returncode


def test_minilm_images_for_amd64_and_arm64_serve_the_same_embeddings(
    engine: dict[str, str], minilm_run: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    image = "edge-compress-test/minilm:ci"
    args = ["package", str(minilm_run), "--image", image, "--arch", "all", "--out", str(tmp_path / "b")]
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", *args],
        env={**engine, "COLUMNS": "200"}, capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"image: {image}-amd64 (linux/amd64" in proc.stdout and f"image: {image}-arm64 (linux/arm64" in proc.stdout
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    texts = [
        "The central bank raised interest rates by half a point.",
        "A new phone was released with a faster chip.",
        "Storms flooded the coast overnight and thousands lost power.",
    ]
    answers: dict[str, Any] = {}
    for arch in ("amd64", "arm64"):
        tag = images.arch_tag(image, arch)
        assert docker(engine, "image", "inspect", "-f", "{{.Architecture}}", tag).stdout.strip() == arch
        user, torch_code = _user_and_torch(engine, tag, arch)
        assert user == "10001:10001" and torch_code != 0  # non-root, and no PyTorch in the runtime image
        cid, port, _ = serve(engine, tag, arch)
        try:
            client = Client(port)
            status, answers[arch] = client.predict({"texts": texts})
            assert status == 200
            status, info = client.request("GET", "/metadata")
            assert info["model_sha256"] == meta["model_sha256"] and info["validated"]["passed"]
            assert info["runtime"]["machine"] == {"amd64": "x86_64", "arm64": "aarch64"}[arch]
            assert client.predict({"texts": []})[0] == 422  # a bad request, and the container keeps serving
            assert client.request("GET", "/healthz")[0] == 200
        finally:
            stop(engine, cid)
    amd, arm = (np.asarray(answers[a]["embeddings"], dtype=np.float32) for a in ("amd64", "arm64"))
    session = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "b" / "tokenizer")
    enc = tok(texts, padding=True, return_tensors="np")
    native = session.run(None, {k: enc[k].astype(np.int64) for k in meta["inputs"]})[0]
    np.testing.assert_allclose(amd, native, atol=1e-5)  # the amd64 container is this CPU's ONNX Runtime
    assert answers["amd64"]["tokens"] == answers["arm64"]["tokens"]
    cosine = (amd * arm).sum(axis=1) / (np.linalg.norm(amd, axis=1) * np.linalg.norm(arm, axis=1))
    assert cosine.min() >= 0.99, cosine  # ARM's int8 kernels, not a different model


def test_docker_targets_validate_a_custom_op_model_inside_both_runtime_images(
    engine: dict[str, str], zoo_recipe: Callable[..., Path]
) -> None:
    """A windowed zoo model (our WindowedAttention op) validated in the amd64 and arm64 runtime images."""
    for arch in ("amd64", "arm64"):
        images.build_runtime(arch, engine, lambda _msg: None)
    path = zoo_recipe(train={"epochs": 1})
    spec = yaml.safe_load(path.read_text())
    spec["stages"] += [
        {"type": "export"},
        {"type": "quantize", "mode": "dynamic"},
        {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32, "emulated_samples": 8, "emulated_runs": 2},
    ]
    amd, arm = (f"docker:{images.runtime_tag(a)}" for a in ("amd64", "arm64"))
    spec["targets"] = ["x86_64", amd, arm]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.environ["DOCKER_HOST"] = engine["DOCKER_HOST"]
    try:
        run_dir = _run(path)
    finally:
        del os.environ["DOCKER_HOST"]
    report = json.loads((run_dir / "report.json").read_text())
    for name, machine, kind in ((amd, "x86_64", "docker"), (arm, "aarch64", "emulated")):
        target = report["targets"][name]
        assert target["setup"]["arch"] == machine and target["setup"]["kind"] == kind, target["setup"]
        assert target["setup"]["custom_op_kernel"].startswith("native"), target["setup"]["custom_op_kernel"]
        assert target["consistency"]["value"] == 1.0 and target["gate"]["passed"]
    assert not [w for w in report["warnings"] if "function bod" in w]


def test_pipeline_image_runs_the_demo_recipe_offline_and_its_run_packages(
    engine: dict[str, str], tmp_path: Path
) -> None:
    """The amd64 pipeline image (PyTorch CPU + edge-compress) runs recipes/minilm-int8.yaml with no network."""
    from compress.serving.bundle import write_bundle

    tag = images.build_pipeline(engine, lambda _msg: None)
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the image's user (10001) writes the run here
    spec = yaml.safe_load((REPO / "recipes" / "minilm-int8.yaml").read_text())
    spec["output"] = {"dir": "runs"}
    spec["stages"][-1]["runs"] = 10
    (work / "minilm.yaml").write_text(yaml.safe_dump(spec))
    proc = docker(
        engine, "run", "--rm", "--network", "none", "-v", f"{work}:/work", tag, "run", "minilm.yaml", check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((work / "runs" / "minilm-int8" / "report.json").read_text())
    target = report["targets"]["x86_64"]
    assert target["gate"]["passed"] and target["artifact"]["kernels"]["int8"].get("QAttention") == 6
    assert report["provenance"]["packages"]["torch"].startswith("2.13.0")
    meta = write_bundle(work / "runs" / "minilm-int8", tmp_path / "bundle")
    assert meta["validated"]["passed"] and meta["task"] == "embedding"

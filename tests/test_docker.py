"""The private Docker engine and the runtime images: amd64 and arm64 images, served predictions.

The tests marked docker run a real engine with `edge-compress docker start` semantics (own socket, data
root and PID), stopped at the end; the host's networking must be what it was before. arm64 containers
run under qemu-aarch64 through binfmt_misc. They need root (Debian's docker.io, mmdebstrap and binfmt
are set up here). Served containers share the host's network (the engine has no bridge) with the server
bound to 127.0.0.1 only.

The unmarked tests check, without a dockerd, that stop() signals only our own dockerd and leaves the
host's networking alone (reporting what changed), and that host setup says what it does before it.
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
from compress.targets.docker import run_flags
from tests.test_serving import Client, _run, free_port

real_engine = pytest.mark.skipif(os.geteuid() != 0, reason="a private Docker engine needs root")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    before = host_network()
    eng = Engine(images.build_root() / "engine")
    eng.start(lambda _msg: None)
    yield eng.env()
    assert eng.stop() == []  # no network of ours to remove, nothing changed since start
    assert eng.pid() is None
    exec_root = str((eng.root / "exec").resolve())
    assert [m for m in Path("/proc/self/mounts").read_text().splitlines() if exec_root in m] == []  # netns unmounted
    assert host_network() == before  # forwarding, links and iptables rules as they were


def docker(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, *args], env=env, capture_output=True, text=True, check=check, timeout=600)


def serve(env: dict[str, str], image: str, arch: str) -> tuple[str, int, float]:
    """Start `image` on a free loopback port; returns the container, the port and seconds to the first answer.

    The engine has no bridge, so no published ports: the container shares the host's network and its
    server listens on 127.0.0.1 only (the image's default, 0.0.0.0, is for a container of its own network).
    """
    port = free_port()
    start = time.perf_counter()
    run = ["run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}", *run_flags(arch), image]
    cid = docker(env, *run, "--host", "127.0.0.1").stdout.strip()
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


def listening(port: int) -> set[str]:
    """The addresses a TCP socket listens on at `port`, from /proc/net/tcp{,6} (a host-network container's too)."""
    import ipaddress

    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / table
        for line in path.read_text().splitlines()[1:] if path.is_file() else []:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))  # each 32-bit word little-endian
                found.add(str(ipaddress.ip_address(raw)))
    return found


def stop(env: dict[str, str], cid: str) -> None:
    """docker stop sends SIGTERM: the server (PID 1) must exit on it, well before the 20 s kill."""
    start = time.perf_counter()
    docker(env, "stop", "-t", "20", cid)
    assert time.perf_counter() - start < 15


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private registry on loopback (HOST:PORT): the Distribution registry of Debian's docker-registry package,
    unpacked, not installed (installing it would start a system service on port 5000)."""
    import urllib.request

    folder = images.build_root() / "registry"
    binary = folder / "usr" / "bin" / "docker-registry"
    if not binary.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        download = ["apt-get", "download", "docker-registry"]
        if subprocess.run(download, cwd=folder, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
            subprocess.run(download, cwd=folder, capture_output=True, check=True)
        deb = next(folder.glob("docker-registry_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    data = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = data / "config.yml"
    store = {"filesystem": {"rootdirectory": str(data / "store")}}
    config.write_text(yaml.safe_dump({"version": 0.1, "storage": store, "http": {"addr": f"127.0.0.1:{port}"}}))
    proc = subprocess.Popen([str(binary), "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _platforms(registry: str, repository: str, tag: str) -> list[str]:
    """The platforms of a manifest list, asked of the registry's HTTP API."""
    import urllib.request

    kind = "application/vnd.docker.distribution.manifest.list.v2+json"
    url = f"http://{registry}/v2/{repository}/manifests/{tag}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": kind}), timeout=10) as answer:
        listing = json.loads(answer.read())
    assert listing["mediaType"] == kind, listing.get("mediaType")
    return sorted(m["platform"]["architecture"] for m in listing["manifests"])


@pytest.fixture(scope="module")
def minilm_run(engine: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipe on the real all-MiniLM-L6-v2 (int8), run as a user would in the amd64 pipeline image
    (PyTorch CPU + edge-compress) with no network, validated on this CPU: the run the runtime images serve."""
    tag = images.build_pipeline(engine, lambda _msg: None)
    work = tmp_path_factory.mktemp("minilm")
    work.chmod(0o777)  # the image's user (10001) writes the run here
    spec = yaml.safe_load((REPO / "recipes" / "minilm-int8.yaml").read_text())
    spec["output"] = {"dir": "runs"}
    spec["stages"][-1]["runs"] = 10
    (work / "minilm.yaml").write_text(yaml.safe_dump(spec))
    proc = docker(
        engine, "run", "--rm", "--network", "none", "-v", f"{work}:/work", tag, "run", "minilm.yaml", check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "runs" / "minilm-int8"


def _user_and_torch(env: dict[str, str], image: str, arch: str) -> tuple[str, int]:
    user = docker(env, "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
    probe = docker(env, "run", "--rm", "--network", "none", *run_flags(arch), "--entrypoint", "python3", image,
                   "-c", "import torch", check=False)  # fmt: skip
    return user, probe.returncode


def _sbom_lists_what_is_inside(env: dict[str, str], image: str, arch: str) -> None:
    """The image's /opt/edge-compress/sbom.json (CycloneDX) names its Debian packages, its wheels at the versions
    installed, and our files with the sha256 they have in the image."""
    from importlib.metadata import version

    code = (
        "import hashlib, json; s = json.load(open('/opt/edge-compress/sbom.json')); "
        "print(json.dumps([s, hashlib.sha256(open('/opt/edge-compress/server.py', 'rb').read()).hexdigest()]))"
    )
    probe = docker(env, "run", "--rm", "--network", "none", *run_flags(arch), "--entrypoint", "python3", image,
                   "-c", code)  # fmt: skip
    sbom, server_sha = json.loads(probe.stdout)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["properties"][0]["value"] == arch
    named = {c["name"]: c for c in sbom["components"]}
    for package in ("onnxruntime", "numpy", "tokenizers", "uvicorn", "h11", "prometheus_client"):
        assert named[package]["version"] == version(package), package
    assert named["python3.11-minimal"]["purl"].startswith("pkg:deb/debian/python3.11-minimal@3.11")
    assert named["/opt/edge-compress/server.py"]["hashes"][0]["content"] == server_sha


@pytest.mark.docker
@real_engine
def test_minilm_images_for_amd64_and_arm64_serve_the_same_embeddings(
    engine: dict[str, str], minilm_run: Path, tmp_path: Path, registry: str
) -> None:
    import onnxruntime as ort

    image = f"{registry}/edge-compress-test/minilm:ci"  # one multi-arch tag, pushed over the two arch tags
    args = ["package", str(minilm_run), "--image", image, "--arch", "all", "--push", "--out", str(tmp_path / "b")]
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", *args],
        env={**engine, "COLUMNS": "200"}, capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"image: {image}-amd64 (linux/amd64" in proc.stdout and f"image: {image}-arm64 (linux/arm64" in proc.stdout
    assert f"pushed: {image} (a manifest list over amd64, arm64" in proc.stdout
    assert _platforms(registry, "edge-compress-test/minilm", "ci") == ["amd64", "arm64"]
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
        _sbom_lists_what_is_inside(engine, tag, arch)
        cid, port, _ = serve(engine, tag, arch)
        try:
            assert listening(port) == {"127.0.0.1"}  # the served model is not reachable from outside
            client = Client(port)
            status, answers[arch] = client.predict({"texts": texts})
            assert status == 200
            status, info = client.request("GET", "/metadata")
            assert info["model_sha256"] == meta["model_sha256"] and info["validated"]["passed"]
            assert info["runtime"]["machine"] == {"amd64": "x86_64", "arm64": "aarch64"}[arch]
            assert client.predict({"texts": []})[0] == 422  # a bad request, and the container keeps serving
            assert client.request("GET", "/healthz")[0] == 200
            if arch == "amd64":
                _clients_get_the_in_process_embeddings(port, tmp_path / "b", texts, str(meta["name"]))
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


def _clients_get_the_in_process_embeddings(port: int, bundle: Path, texts: list[str], name: str) -> None:
    """OpenAI's client and a KServe v2 request built by hand, pointed at the container, get the in-process
    model's embeddings (one text per request: dynamic int8 ranges are per run)."""
    from openai import OpenAI

    from compress.serving import server

    model = server.Model(bundle, 2)
    alone = [np.asarray(model.predict([t])["embeddings"][0]) for t in texts]
    openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    kserve = Client(port)
    for text, expected in zip(texts, alone, strict=True):
        got = np.asarray(openai.embeddings.create(model=name, input=text, encoding_format="float").data[0].embedding)
        assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) >= 0.9999
        request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        body = json.dumps(request).encode()
        status, answer = kserve.request("POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})
        got = np.asarray(answer["outputs"][0]["data"])
        assert status == 200 and got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) >= 0.9999


@pytest.mark.docker
@real_engine
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


@pytest.mark.docker
@real_engine
def test_pipeline_image_runs_the_demo_recipe_offline_and_its_run_packages(minilm_run: Path, tmp_path: Path) -> None:
    """The amd64 pipeline image ran recipes/minilm-int8.yaml with no network (the minilm_run fixture)."""
    from compress.serving.bundle import write_bundle

    report = json.loads((minilm_run / "report.json").read_text())
    target = report["targets"]["x86_64"]
    assert target["gate"]["passed"] and target["artifact"]["kernels"]["int8"].get("QAttention") == 6
    assert report["provenance"]["packages"]["torch"].startswith("2.13.0")
    meta = write_bundle(minilm_run, tmp_path / "bundle")
    assert meta["validated"]["passed"] and meta["task"] == "embedding"


# Without a dockerd: the engine's stop() and the host setup, on fakes. Nothing here signals, deletes or
# reverts anything on the host, even on code that would: commands are recorded, not run.


def test_listening_sees_a_loopback_server() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert listening(sock.getsockname()[1]) == {"127.0.0.1"}


def _fake_dockerd(args: list[str]) -> subprocess.Popen[bytes]:
    """A process whose command line reads `dockerd ARGS...` (a Python sleeping), for the engine's PID check."""
    code = "import time; time.sleep(120)"
    proc = subprocess.Popen(["dockerd", "-c", code, *args], executable=sys.executable)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != b"dockerd":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The engine module's subprocess.run, recorded: only *-save (reading the rules) really runs."""
    from compress.container import engine as module

    calls: list[list[str]] = []
    real = subprocess.run

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        if str(cmd[0]).endswith("-save"):
            return real(cmd, *args, **kwargs)
        calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(module.subprocess, "run", run)
    return calls


def test_stop_does_not_signal_an_unrelated_process_holding_the_pidfiles_pid(
    tmp_path: Path, recorded: list[list[str]]
) -> None:
    eng = Engine(tmp_path / "engine")
    eng.root.mkdir()
    other = tmp_path / "other"
    unrelated = [
        subprocess.Popen(["sleep", "120"]),  # not a dockerd at all
        _fake_dockerd(["--data-root", str(other / "data"), "-H", f"unix://{other}/docker.sock"]),  # someone else's
    ]
    try:
        for proc in unrelated:
            eng.pidfile.write_text(f"{proc.pid}\n")
            assert eng.pid() is None
            messages = eng.stop()
            time.sleep(0.3)
            assert proc.poll() is None  # still running: never signalled
            assert not eng.pidfile.exists()
            assert messages == [
                f"removed the stale pidfile {eng.pidfile}: PID {proc.pid} is not our dockerd "
                f"({' '.join(proc.args)[:80]}), not signalled"  # type: ignore[arg-type]
            ]
    finally:
        for proc in unrelated:
            proc.kill()
            proc.wait()
    assert recorded == []  # no docker client, no ip, no iptables-restore


def test_stop_removes_our_networks_through_our_socket_then_stops_our_dockerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[list[str]]
) -> None:
    eng = Engine(tmp_path / "engine")
    eng.root.mkdir()
    ours = _fake_dockerd(["--data-root", str(eng.data_root), "--exec-root", str(eng.root / "exec"), "-H", eng.host])
    eng.pidfile.write_text(f"{ours.pid}\n")
    client: list[tuple[str, ...]] = []

    def fake_client(*args: str) -> subprocess.CompletedProcess[str]:
        assert ours.poll() is None  # the daemon still runs while its networks go
        client.append(args)
        out = {"ls": "edge-test-net\n", "inspect": "c0ffee "}.get(args[1], "")
        return subprocess.CompletedProcess(list(args), 0, out, "")

    monkeypatch.setattr(eng, "answers", lambda: True)
    monkeypatch.setattr(eng, "_client", fake_client)
    try:
        assert eng.pid() == ours.pid
        assert eng.stop() == ["removed network edge-test-net (ours)"]
        assert ours.wait(timeout=10) == -15  # SIGTERM
    finally:
        ours.kill()
        ours.wait()
    assert client[0][:4] == ("network", "ls", "--filter", "type=custom")
    assert ("network", "disconnect", "-f", "edge-test-net", "c0ffee") in client
    assert client[-1] == ("network", "rm", "edge-test-net")
    assert not eng.pidfile.exists() and recorded == []


def test_stop_reports_host_networking_changed_since_start_and_reverts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[list[str]]
) -> None:
    """A snapshot "from the start" that differs from now: as if the host changed while the engine ran."""
    now = host_network()
    before = json.loads(json.dumps(now))
    before["links"] = [ln for ln in now["links"] if ln != "lo"] + ["edge-test0"]  # lo "appeared", edge-test0 "went"
    for name, value in now["sysctls"].items():
        before["sysctls"][name] = "1" if value == "0" else "0"
    before["rules"] = dict.fromkeys(now["rules"], "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    written: list[str] = []
    real_write = Path.write_text

    def guarded(path: Path, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith("/proc/"):
            written.append(str(path))
            return 0
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", guarded)
    eng = Engine(tmp_path / "engine")
    eng.root.mkdir()
    eng.snapshot.write_text(json.dumps(before))
    messages = eng.stop()
    assert written == [] and recorded == []  # no sysctl written, no `ip link delete`, no iptables-restore
    assert Path("/sys/class/net/lo").exists()
    assert host_network() == now
    assert all(m.startswith("changed since start, left as is: ") for m in messages), messages
    text = "\n".join(messages)
    assert "new network link lo" in text and "network link edge-test0 gone" in text
    for name in now["sysctls"]:
        assert f"{name.replace('/', '.')} {before['sysctls'][name]} -> {now['sysctls'][name]}" in text
    for tool in now["rules"]:
        if now["rules"][tool] is not None:
            assert f"{tool.replace('-save', '')} rules differ" in text
    assert not eng.snapshot.exists()
    assert eng.stop() == []  # the second time: nothing to report


def test_binfmt_registration_is_announced_before_it_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    misc, conf = tmp_path / "binfmt_misc", tmp_path / "qemu-aarch64.conf"
    misc.mkdir()
    (misc / "register").write_text("")
    conf.write_text(":qemu-aarch64:M::\\x7fELF:mask:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OCPF\n")
    monkeypatch.setattr(images, "BINFMT_MISC", misc)
    monkeypatch.setattr(images, "BINFMT_CONF", conf)
    monkeypatch.setattr(images, "host_arch", lambda: "amd64")
    monkeypatch.setattr(images.os, "geteuid", lambda: 0)
    monkeypatch.setattr("compress.container.images.ensure_tools", lambda *_args: None)
    said: list[tuple[str, str]] = []
    images.ensure_binfmt(lambda msg: said.append((msg, (misc / "register").read_text())))
    assert len(said) == 1
    message, registered_then = said[0]
    assert registered_then == ""  # said before the registration
    assert "registering qemu-aarch64 with binfmt_misc on this host" in message and str(conf) in message
    assert (misc / "register").read_text() == conf.read_text()

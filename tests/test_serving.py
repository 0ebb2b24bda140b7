"""The deployable bundle and its inference server, natively: the same server.py the runtime images run.

A tiny BERT goes through export -> quantize -> validate; `edge-compress package` writes its bundle and
the server (a real subprocess on loopback) must answer what the pipeline's own ONNX Runtime session
answers, refuse bad requests with a 4xx and one-line JSON, and keep serving under load.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime.feeds import encoder
from compress.serving import server
from compress.serving.bundle import final_stage, write_bundle
from compress.serving.bundle_check import sha256_of
from tests.conftest import TEXTS
from tests.test_cli import assert_user_error, cli

SERVER = Path(__file__).resolve().parents[1] / "compress" / "serving" / "server.py"


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client:
    """HTTP/1.1 on one keep-alive connection, as a device's client would hold it."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        self.conn.request(method, path, body=body, headers=headers or {})
        answer = self.conn.getresponse()
        data = answer.read()
        if answer.getheader("Connection") == "close":
            self.conn.close()
        return answer.status, json.loads(data)

    def predict(self, payload: Any) -> tuple[int, Any]:
        return self.request("POST", "/v1/predict", json.dumps(payload).encode(), {"Content-Type": "application/json"})


def start_server(bundle: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """The server in a process of its own; its stderr (the JSON access log) goes to a file, `proc.log`, so that
    a chatty server never blocks on a full pipe."""
    log = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(bundle), "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints one line once it listens
    assert line.startswith("serving "), (line, log.read_text() if proc.poll() is not None else "")
    return proc


@pytest.fixture
def served(recipe_for: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    run_dir = _run(recipe_for())
    bundle = tmp_path / "bundle"
    write_bundle(run_dir, bundle)
    port = free_port()
    proc = start_server(bundle, port, "--max-body-bytes", "4096", "--max-texts", "8")
    yield run_dir, bundle, port
    proc.terminate()
    assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown (as PID 1 in a container, too)


def test_server_answers_what_the_pipeline_session_answers(served: tuple[Path, Path, int]) -> None:
    import onnxruntime as ort

    run_dir, bundle, port = served
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["task"] == "embedding" and meta["precision"] == "int8" and meta["validated"]["passed"]
    assert meta["max_length"] == 32 and meta["tokenizer"] == "wordpiece" and "x86_64" in meta["targets"]
    last = sorted(run_dir.glob("0*_validate"))[0]
    artifact = Artifact.from_json((last / "artifact.json").read_text(), run_dir)
    feeds = encoder(artifact)(TEXTS[:5], 32, None)
    session = ort.InferenceSession(str(artifact.file("model")), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]

    client = Client(port)
    status, answer = client.predict({"texts": list(TEXTS[:5])})
    assert status == 200
    got = np.asarray(answer["embeddings"], dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)  # same tokens, same graph, same kernels
    assert answer["tokens"] == feeds["attention_mask"].sum(axis=1).tolist()
    status, one = client.predict({"text": TEXTS[0]})  # alone: unpadded (dynamic int8 ranges see no padding)
    assert status == 200
    alone = session.run(None, encoder(artifact)(TEXTS[:1], 32, None))[0]
    np.testing.assert_allclose(one["embeddings"][0], alone[0], atol=1e-5)

    status, info = client.request("GET", "/metadata")
    assert status == 200 and info["model_sha256"] == meta["model_sha256"] and "name: tiny" in info["recipe"]
    assert info["runtime"]["onnxruntime"] == ort.__version__
    assert not _host_paths(info, run_dir)  # /metadata names no folder of the machine that packaged it
    assert client.request("GET", "/healthz") == (200, {"status": "ok", "requests": 2, "errors": 0})


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b'{"texts": ["a"', {"Content-Type": "application/json"}, 400, "malformed JSON"),
        (b'{"texts": []}', {"Content-Type": "application/json"}, 422, "non-empty list"),
        (b'{"texts": ["  "]}', {"Content-Type": "application/json"}, 422, "texts[0] is empty"),
        (b'{"texts": [3]}', {"Content-Type": "application/json"}, 422, "not a string"),
        (b'["a"]', {"Content-Type": "application/json"}, 422, "JSON object"),
        (b'{"texts": ["a"], "top_k": 3}', {"Content-Type": "application/json"}, 422, "unknown field 'top_k'"),
        (b'{"texts": ["a"], "truncate": "yes"}', {"Content-Type": "application/json"}, 422, "truncate"),
        (json.dumps({"texts": ["bank"] * 9}).encode(), {"Content-Type": "application/json"}, 413, "limit is 8"),
        (json.dumps({"text": "bank " * 40}).encode(), {"Content-Type": "application/json"}, 413, "at most 32"),
        (b'{"texts": ["a"]}', {"Content-Type": "text/plain"}, 415, "application/json"),
        (b"x" * 5000, {"Content-Type": "application/json"}, 413, "limit is 4096"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(
    served: tuple[Path, Path, int], body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    _, _, port = served
    client = Client(port)
    got, answer = client.request("POST", "/v1/predict", body, headers)
    assert got == status and needle in answer["error"] and "\n" not in answer["error"]
    if client.conn.sock is None:  # the server closed a connection whose body it did not read
        client = Client(port)
    status_ok, ok = client.predict({"texts": ["the bank raised rates"]})
    assert status_ok == 200 and len(ok["embeddings"]) == 1
    assert client.request("GET", "/healthz")[1]["errors"] == 1


def test_routes_lengths_and_truncation(served: tuple[Path, Path, int]) -> None:
    _, _, port = served
    client = Client(port)
    assert client.request("GET", "/nope")[0] == 404
    assert client.request("GET", "/v1/predict")[0] == 405
    assert client.request("PUT", "/v1/predict", b"{}", {"Content-Type": "application/json"})[0] == 405
    status, answer = client.predict({"text": "bank " * 40, "truncate": True})
    assert status == 200 and answer["tokens"] == [32]
    # no Content-Length: 411, then the connection is closed and a new one works
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
    assert raw.recv(4096).split(b" ")[1] == b"411"
    raw.close()
    assert Client(port).predict({"text": "bank"})[0] == 200


def _load(port: int, requests: int, seconds: float) -> dict[str, Any]:
    """A second process sends `requests` single-text requests (bounded by `seconds`) on one connection."""
    code = f"""
import http.client, json, time, sys
conn = http.client.HTTPConnection("127.0.0.1", {port}, timeout=30)
texts = {list(TEXTS)!r}
lat, codes, start = [], {{}}, time.perf_counter()
for i in range({requests}):
    if time.perf_counter() - start > {seconds}:
        break
    body = json.dumps({{"texts": [texts[i % len(texts)]]}})
    t = time.perf_counter()
    conn.request("POST", "/v1/predict", body=body, headers={{"Content-Type": "application/json"}})
    answer = conn.getresponse(); answer.read()
    lat.append((time.perf_counter() - t) * 1000); codes[answer.status] = codes.get(answer.status, 0) + 1
print(json.dumps({{"latency_ms": lat, "codes": codes, "seconds": time.perf_counter() - start}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_server_under_load_from_another_process(served: tuple[Path, Path, int]) -> None:
    _, _, port = served
    result = _load(port, requests=200, seconds=30)
    latencies = np.asarray(result["latency_ms"])
    assert result["codes"] == {"200": len(latencies)} and len(latencies) >= 20
    throughput = len(latencies) / result["seconds"]
    print(
        f"\nserver: {throughput:.0f} req/s, "
        f"p50 {np.percentile(latencies, 50):.2f} ms, p99 {np.percentile(latencies, 99):.2f} ms"
    )
    status, health = Client(port).request("GET", "/healthz")
    assert status == 200 and health["requests"] == len(latencies)


def test_package_cli_writes_the_bundle_and_refuses_bad_runs(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = _run(recipe_for(stages=[{"type": "export"}, {"type": "quantize", "mode": "dynamic"}]))
    proc = cli("package", str(run_dir))
    assert_user_error(proc, "no validate stage", "--allow-unvalidated")
    proc = cli("package", str(run_dir), "--allow-unvalidated", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "not validated" in proc.stderr
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["validated"]["passed"] is False and (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()
    before = (tmp_path / "b" / "model.onnx").read_bytes()
    assert_user_error(cli("package", str(tmp_path / "missing")), "no such run folder")
    assert_user_error(cli("package", str(run_dir), "--arch", "arm64"), "--arch needs --image")
    (run_dir / "02_quantize" / "done").unlink()
    assert_user_error(
        cli("package", str(run_dir), "--allow-unvalidated", "--out", str(tmp_path / "b")), "did not finish"
    )
    assert (tmp_path / "b" / "model.onnx").read_bytes() == before  # a refused package leaves the bundle whole


def test_server_refuses_a_tampered_or_missing_bundle(served: tuple[Path, Path, int], tmp_path: Path) -> None:
    _, bundle, _ = served
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    for folder, needle in ((copy, "is not the packaged"), (tmp_path / "none", "no metadata.json")):
        proc = subprocess.run(
            [sys.executable, str(SERVER), "--model", str(folder), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_classification_bundle_with_custom_ops_serves_labels_and_scores(
    zoo_recipe: Callable[..., Path], tmp_path: Path
) -> None:
    """A windowed zoo classifier (byte tokenizer, our WindowedAttention op): the server's scores are ORT's softmax."""
    import onnxruntime as ort
    import yaml

    from exporters import native

    if not native.available():
        pytest.skip("the native kernels are not built (edge-compress build-ops)")
    path = zoo_recipe(train={"epochs": 1})
    spec = yaml.safe_load(path.read_text())
    spec["stages"] += [
        {"type": "export"},
        {"type": "quantize", "mode": "dynamic"},
        {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32},
    ]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_dir = _run(path)
    bundle = tmp_path / "bundle"
    meta = write_bundle(run_dir, bundle)
    assert meta["task"] == "classification" and meta["tokenizer"] == "bytes"
    assert meta["custom_ops"] == ["WindowedAttention"]
    texts = ["win cash now you won a prize", "meeting moved to friday see you"]
    options = ort.SessionOptions()
    native.register(options)
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    port = free_port()
    # Without the kernels the server refuses to start rather than run the ops some other way.
    refused = subprocess.run(
        [sys.executable, str(SERVER), "--model", str(bundle), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "EDGE_COMPRESS_OPS_LIBRARY"},
    )
    assert refused.returncode == 2 and "WindowedAttention" in refused.stderr
    proc = start_server(bundle, port, "--ops-library", str(native.library_path()))
    try:
        status, answer = Client(port).predict({"texts": texts})
        status_info, info = Client(port).request("GET", "/metadata")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert status == 200 and status_info == 200
    assert info["runtime"]["custom_ops_library_isa"] in native.check_compatible()["kernels"]
    rows = [[1, *(b + 3 for b in text.encode()), 2] for text in texts]  # [CLS] bytes+3 [SEP], padded with 0
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    logits = session.run(None, {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)})[0]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(answer["scores"], probs, atol=1e-5)
    assert answer["labels"] == probs.argmax(axis=1).tolist() and answer["tokens"] == [len(r) for r in rows]


def test_package_image_without_an_engine_and_serve_without_a_bundle_are_one_line_errors(
    served: tuple[Path, Path, int], tmp_path: Path
) -> None:
    run_dir, _, _ = served
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no.sock", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "package", str(run_dir), "--out", str(tmp_path / "b"), "--image", "x:y"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    from compress.container.engine import CLIENT

    # Without the docker client (a fresh machine before test_docker installs it) the error names that instead.
    expected = "no engine answers" if Path(CLIENT).is_file() else "no client at"
    assert_user_error(proc, expected, "edge-compress docker start")
    assert (tmp_path / "b" / "metadata.json").is_file()  # the bundle was written before the image was asked for
    proc = cli("serve", str(tmp_path / "missing"), "--port", str(free_port()))
    assert_user_error(proc, "no metadata.json")


# ------------------------------------------------------------------------- bundle safety (issue 20)


def _host_paths(meta: Any, run_dir: Path) -> list[str]:
    """Every string in `meta` that names a folder of this machine."""
    roots = {"/root", "/work", "/tmp", "/home", str(run_dir), str(Path.home()), str(Path.cwd())}
    if isinstance(meta, dict):
        return [s for v in meta.values() for s in _host_paths(v, run_dir)]
    if isinstance(meta, list):
        return [s for v in meta for s in _host_paths(v, run_dir)]
    return [meta] if isinstance(meta, str) and any(root in meta for root in roots) else []


def _shipped_model(run_dir: Path) -> Path:
    """The run's model that `package` ships: the last stage's."""
    return Artifact.from_json((final_stage(run_dir) / "artifact.json").read_text(), run_dir).file("model")


def test_package_replaces_only_its_own_bundles(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = _run(recipe_for())
    bundle = tmp_path / "bundle"
    first = write_bundle(run_dir, bundle)
    second = write_bundle(run_dir, bundle)  # a bundle of ours is replaced whole
    assert second["model_sha256"] == first["model_sha256"]
    (bundle / "Dockerfile").write_text("FROM edge-compress/runtime:amd64\n")  # a user's file beside ours
    with pytest.raises(UserError, match="holds files of yours"):
        write_bundle(run_dir, bundle)
    assert (bundle / "Dockerfile").read_text().startswith("FROM") and (bundle / "metadata.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(run_dir, empty)
    assert (empty / "metadata.json").is_file()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not a bundle")
    (foreign / "metadata.json").write_text('{"format": "someone-else"}')
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out in (foreign, afile):
        with pytest.raises(UserError, match="exists and is not an edge-compress bundle") as refused:
            write_bundle(run_dir, out)
        assert "\n" not in str(refused.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg", "metadata.json"]
    assert (foreign / "holiday.jpg").read_bytes() == b"not a bundle" and afile.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers


def test_package_reads_only_its_own_stage_folders(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = _run(recipe_for())
    backup = run_dir / "99_backup"
    shutil.copytree(run_dir / "01_export", backup)  # a user's copy of a stage, `done` and all
    meta = write_bundle(run_dir, tmp_path / "bundle")
    assert meta["precision"] == "int8"  # the quantize stage's model, not the backup's fp32 copy
    assert backup.is_dir()


def test_bundle_is_a_copy_with_every_file_hashed_and_no_host_path(
    recipe_for: Callable[..., Path], tmp_path: Path
) -> None:
    run_dir = _run(recipe_for())
    bundle = tmp_path / "bundle"
    write_bundle(run_dir, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    model = _shipped_model(run_dir)
    assert (bundle / "model.onnx").stat().st_ino != model.stat().st_ino  # a copy, not a hard link
    before = model.read_bytes()
    with (bundle / "model.onnx").open("r+b") as handle:  # edit the bundle's file in place
        handle.write(b"\0\0\0\0")
    assert model.read_bytes() == before  # the run's model is untouched
    measured = json.loads((run_dir / "report.json").read_text())["provenance"]["validated_model"]
    assert measured["path"] == str(model.relative_to(run_dir.resolve()))
    assert measured["sha256"] == meta["model_sha256"] == meta["validated"]["sha256"] == sha256_of(model)

    listed = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"metadata.json"}
    assert set(meta["files"]) == listed and "tokenizer/tokenizer.json" in listed
    assert all(sha256_of(bundle / name) == digest for name, digest in meta["files"].items() if name != "model.onnx")
    assert meta["version"] == 2 and meta["files"]["model.onnx"] == meta["model_sha256"]
    assert not _host_paths(meta, run_dir), _host_paths(meta, run_dir)
    assert "hf: <path>/" in meta["recipe"] and "name: tiny" in meta["recipe"]


def test_package_refuses_a_model_changed_after_validation(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = _run(recipe_for())
    bundle = tmp_path / "bundle"
    write_bundle(run_dir, bundle)
    packaged = (bundle / "model.onnx").read_bytes()
    model = _shipped_model(run_dir)
    model.write_bytes(model.read_bytes() + b"\0")  # not the file validate measured any more
    for allow in (False, True):  # --allow-unvalidated does not help: this file was never validated
        with pytest.raises(UserError, match=r"is not the \w+ validate measured") as refused:
            write_bundle(run_dir, bundle, allow_unvalidated=allow)
        assert "\n" not in str(refused.value)
    assert (bundle / "model.onnx").read_bytes() == packaged  # the bundle of the validated file stays


_DROP = object()  # _edit_meta(key=_DROP) removes the key


def _edit_meta(**changes: Any) -> Callable[[Path], None]:
    def edit(bundle: Path) -> None:
        meta = json.loads((bundle / "metadata.json").read_text())
        meta.update(changes)
        for key in [k for k, v in changes.items() if v is _DROP]:
            del meta[key]
        (bundle / "metadata.json").write_text(json.dumps(meta))

    return edit


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def write(bundle: Path) -> None:
        (bundle / name).write_bytes(data)

    return write


def _truncate(bundle: Path) -> None:
    model = bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def _truncate_and_rehash(bundle: Path) -> None:
    """A truncated model.onnx whose hashes were updated to match: only ONNX Runtime can tell."""
    _truncate(bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["model_sha256"] = meta["files"]["model.onnx"] = sha256_of(bundle / "model.onnx")
    (bundle / "metadata.json").write_text(json.dumps(meta))


BAD_BUNDLES: list[tuple[str, Callable[[Path], None], str]] = [
    ("metadata.json is not JSON", _write("metadata.json", b'{"format": "edge-'), "not readable JSON"),
    ("metadata.json is not UTF-8", _write("metadata.json", b"\xff\xfe{"), "not readable JSON"),
    ("metadata.json is a list", _write("metadata.json", b"[1, 2]"), "not an edge-compress-bundle"),
    ("an older bundle", _edit_meta(version=1, files=_DROP), "re-package"),
    *((f"no {key}", _edit_meta(**{key: _DROP}), f"no '{key}'") for key in ("task", "inputs", "max_length")),
    *((f"no {key}", _edit_meta(**{key: _DROP}), f"no '{key}'") for key in ("tokenizer", "model_sha256")),
    ("no files", _edit_meta(files=_DROP), "re-package"),
    ("max_length a string", _edit_meta(max_length="32"), "'max_length' must be an integer"),
    ("inputs a string", _edit_meta(inputs="input_ids"), "'inputs' must be"),
    ("task a number", _edit_meta(task=3), "'task' must be"),
    ("files a list", _edit_meta(files=["model.onnx"]), "'files' must be"),
    ("labels a number", _edit_meta(labels=5), "'labels' must be"),
    ("session a list", _edit_meta(session=[]), "'session' must be"),
    ("tokenizer.json modified", _write("tokenizer/tokenizer.json", b'{"version": "1.0"}'), "is not the packaged"),
    ("no tokenizer folder", lambda bundle: shutil.rmtree(bundle / "tokenizer"), "tokenizer.json: missing"),
    ("truncated model", _truncate, "is not the packaged"),
    ("truncated model rehashed", _truncate_and_rehash, "ONNX Runtime cannot load it"),
]


def _serves_nothing(*_: Any, **__: Any) -> None:
    """server.serve in-process: a bundle that loads after all ends the test, not hangs it."""


def test_server_refuses_bad_bundles_with_one_line(
    recipe_for: Callable[..., Path], tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _run(recipe_for())
    good = tmp_path / "good"
    files = write_bundle(run_dir, good).get("files", {})
    unlisted = _edit_meta(files={k: v for k, v in files.items() if k != "tokenizer/tokenizer_config.json"})
    escaped = _edit_meta(files={**files, "../outside.txt": "0" * 64})
    cases = [*BAD_BUNDLES, ("an unlisted config", unlisted, "no sha256 of tokenizer/tokenizer_config.json")]
    cases.append(("a path outside", escaped, "outside the bundle"))
    monkeypatch.setattr(server, "serve", _serves_nothing)
    for label, spoil, needle in cases:
        bundle = tmp_path / label.replace(" ", "_")
        shutil.copytree(good, bundle)
        spoil(bundle)
        code = server.main(["--model", str(bundle), "--port", "0", "--threads", "1"])
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (label, err)
        assert needle in lines[0] and "Traceback" not in err, (label, lines[0])
    proc = cli("serve", str(tmp_path / "truncated_model_rehashed"), "--port", str(free_port()))
    assert_user_error(proc, "ONNX Runtime cannot load it")  # the command people run: no "internal error"

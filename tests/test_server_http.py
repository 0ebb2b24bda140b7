"""The server as deployments use it: OpenAI's client, KServe's v2 protocol, text-embeddings-inference's routes,
batching of concurrent clients, limits, API keys, metrics, slow and malformed clients, and SIGTERM."""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.serving import server
from compress.serving.bundle import write_bundle
from tests.conftest import TEXTS
from tests.test_serving import Client, _run, free_port, start_server

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def bundle(recipe_for: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    write_bundle(_run(recipe_for()), folder)
    return folder


@pytest.fixture
def served(bundle: Path) -> Iterator[tuple[Path, int, Any]]:
    port = free_port()
    proc = start_server(bundle, port, "--max-texts", "8", "--max-body-bytes", "65536", "--threads", "1")
    yield bundle, port, proc
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    """Send bytes as they are; the status, the JSON body and the headers of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    kind = headers.get("content-type", "")
    answer = json.loads(body) if kind == "application/json" else body.decode()
    return int(lines[0].split(" ")[1]), answer, headers


def post(port: int, path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_kserve_and_tei_clients_get_the_models_embeddings(served: tuple[Path, int, Any]) -> None:
    from openai import OpenAI

    bundle, port, _ = served
    model = server.Model(bundle, 1)
    model.warm_up()
    texts = list(TEXTS[:3])
    alone = [model.predict([t])["embeddings"][0] for t in texts]  # one text per run, as each request below

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    for fmt in ("float", "base64"):  # the client asks for base64 unless told otherwise, and decodes it
        answer = client.embeddings.create(model="tiny", input=texts[0], encoding_format=fmt)  # type: ignore[arg-type]
        got = answer.data[0].embedding
        if isinstance(got, str):
            got = np.frombuffer(base64.b64decode(got), dtype="<f4").tolist()
        assert cosine(got, alone[0]) >= 0.9999 and answer.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(Exception, match="encoding_format"):
        client.embeddings.create(model="tiny", input="a", encoding_format="int8")  # type: ignore[arg-type]

    http = Client(port)  # KServe's v2 protocol, the request built by hand
    assert http.request("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = http.request("GET", "/v2/models/tiny")
    assert status == 200 and meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["name"] == "embedding"
    request = {"id": "r1", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[1]]}]}
    status, answer = http.request("POST", "/v2/models/tiny/infer", json.dumps(request).encode(), JSON)
    assert status == 200 and answer["id"] == "r1" and answer["outputs"][0]["datatype"] == "FP32"
    out = answer["outputs"][0]
    assert out["shape"] == [1, len(alone[1])] and cosine(out["data"], alone[1]) >= 0.9999
    bad_inputs = [
        ({"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}, "shape [2] but data has 1"),
        ({"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}, "texts are BYTES"),
        ({"name": "input_ids", "shape": [1], "datatype": "BYTES", "data": ["a"]}, "this model takes ['text']"),
    ]
    for tensor, needle in bad_inputs:
        body = json.dumps({"inputs": [tensor]}).encode()
        status, error = http.request("POST", "/v2/models/tiny/infer", body, JSON)
        assert status == 400 and needle in error["error"], error
    assert http.request("POST", "/v2/models/other/infer", b"{}", JSON)[0] == 404

    status, vectors = http.request("POST", "/embed", json.dumps({"inputs": texts[2]}).encode(), JSON)
    assert status == 200 and abs(np.linalg.norm(vectors[0]) - 1.0) < 1e-5  # TEI normalises by default
    assert cosine(vectors[0], alone[2]) >= 0.9999
    for path in ("/predict", "/rerank"):  # an embedding model says plainly that it cannot
        status, error = http.request("POST", path, json.dumps({"inputs": "a", "query": "a"}).encode(), JSON)
        assert status == 404 and "/v1/predict" in error["error"] and "\n" not in error["error"]


BAD = [
    ("invalid UTF-8", post(0, "/v1/predict", b'{"texts": ["\xff\xfe"]}'), 400, "not UTF-8"),
    ("lone surrogate", post(0, "/v1/predict", b'{"texts": ["\\ud800"]}'), 422, "lone surrogate"),
    ("nesting bomb", post(0, "/v1/predict", b"[" * 30_000 + b"]" * 30_000), 400, "malformed JSON"),
    ("5,000 digits", post(0, "/v1/predict", b'{"texts": [' + b"7" * 5000 + b"]}"), 400, "malformed JSON"),
    ("10,000 texts", post(0, "/v1/predict", json.dumps({"texts": ["a"] * 10_000}).encode()), 413, "limit is 8"),
    ("signed length", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}", 400, "Content-Length"),
    ("underscored", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1_2\r\n\r\n{}", 400, "Content-Length"),
    (
        "two lengths",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 12\r\n\r\n{}",
        400,
        "Content-Length",
    ),
    (
        "huge header",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        431,
        "limit is 16384",
    ),
    ("OIP datatype", post(0, "/v2/models/tiny/infer", b'{"inputs": [{"name": "text"}]}'), 400, "needs name, shape"),
    ("no such route", b"GET /v3/x HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
]


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_malformed_requests_get_one_json_line_and_memory_stays_flat(served: tuple[Path, int, Any]) -> None:
    _, port, proc = served
    for label, data, status, needle in BAD:
        got, answer, _ = raw(port, data)
        assert got == status and needle in answer["error"] and "\n" not in answer["error"], (label, answer)
        assert Client(port).request("GET", "/healthz?probe=1")[0] == 200, label  # the query string is ignored

    client = Client(port)
    body = json.dumps({"texts": [3]}).encode()  # 422: the connection stays open

    def spam(n: int) -> None:
        for _ in range(n):
            assert client.request("POST", "/v1/predict", body, JSON)[0] == 422

    spam(1000)  # warm: allocator pools, metrics series
    before = _rss_kb(proc.pid)
    spam(10_000)
    grown = _rss_kb(proc.pid) - before
    assert grown < 8 * 1024, f"RSS grew {grown} kB over 10,000 bad requests"
    log = proc.log.read_text().splitlines()  # one JSON line per request, none of them a traceback
    assert len(log) >= 11_000 and json.loads(log[-1])["status"] == 422 and "Traceback" not in "".join(log)


def _slow_headers_are_cut_while_others_are_served(port: int, ok: bytes) -> None:
    """A client sending its headers one byte at a time is cut at --header-timeout (1 s here); others are
    served meanwhile."""
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.perf_counter()
    answered = []
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
        if select.select([slow], [], [], 0)[0]:  # the server has answered (and closed)
            break
        slow.sendall(bytes([byte]))
        answered.append(raw(port, ok)[0])
        time.sleep(0.1)
    rest = slow.recv(65536)
    assert b" 408 " in rest and "headers did not arrive" in rest.decode(), rest
    assert 0.9 < time.perf_counter() - start < 2.5 and set(answered) == {200}
    slow.close()


def test_keys_limits_slow_clients_and_metrics(bundle: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# who may ask\nsecret-one\nsecret-two\n")
    port = free_port()
    args = ["--api-key-file", str(keys), "--max-concurrent", "1", "--header-timeout", "1", "--request-timeout", "2"]
    proc = start_server(bundle, port, *args)
    try:
        ok = post(port, "/v1/predict", b'{"texts": ["the bank"]}', "Authorization: Bearer secret-two\r\n")
        assert raw(port, ok)[0] == 200
        status, error, headers = raw(port, post(port, "/v1/predict", b"{}", "Authorization: Bearer nope\r\n"))
        assert status == 401 and "API key" in error["error"] and headers["www-authenticate"].startswith("Bearer")
        assert raw(port, post(port, "/v1/predict", b"{}"))[0] == 401
        assert raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # health needs no key
        assert raw(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200

        # one request in flight (its body not sent yet) fills --max-concurrent 1: the next gets 429
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        message = post(port, "/v1/predict", b'{"texts": ["a"]}', "Authorization: Bearer secret-one\r\n")
        held.sendall(message[:-5])
        time.sleep(0.3)
        status, error, headers = raw(port, ok)
        assert status == 429 and headers["retry-after"] == "1" and "--max-concurrent" in error["error"]
        held.sendall(message[-5:])  # the rest of the body: it is answered
        assert b" 200 " in held.recv(65536)
        held.close()

        _slow_headers_are_cut_while_others_are_served(port, ok)

        status, text, headers = raw(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret-one\r\n\r\n"
        )
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert 'edge_compress_requests_total{route="/v1/predict",status="200"}' in text
        assert 'edge_compress_requests_total{route="/v1/predict",status="429"} 1.0' in text
        assert "edge_compress_batch_size_count" in text and "edge_compress_model_load_seconds" in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    entries = [json.loads(line) for line in proc.log.read_text().splitlines()]
    assert {e["status"] for e in entries} >= {200, 401, 429} and all("ms" in e for e in entries)


def _sixteen_clients(port: int, texts: list[str]) -> dict[str, Any]:
    got: dict[str, Any] = {}
    errors: list[Any] = []

    def worker(mine: list[str]) -> None:
        client = Client(port)
        for text in mine:
            status, answer = client.predict({"texts": [text]})
            if status != 200:
                errors.append(answer)
            else:
                got[text] = answer["embeddings"][0]

    threads = [threading.Thread(target=worker, args=(texts[k::16],)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(got) == set(texts)
    return got


def _runs(port: int) -> float:
    text = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[1]
    return float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith("edge_compress_batch_size_count"))
    )


def test_concurrent_clients_are_batched_only_when_answers_do_not_depend_on_it(
    served: tuple[Path, int, Any], tmp_path: Path
) -> None:
    bundle, port, _ = served
    import onnx

    from compress.serving.bundle import batch_invariant

    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["batch_invariant"] is False and not batch_invariant(bundle / "model.onnx")  # dynamic int8
    plain = tmp_path / "plain.onnx"  # the same graph without run-time ranges: a float model
    proto = onnx.load(str(bundle / "model.onnx"))
    kept = [n for n in proto.graph.node if n.op_type != "DynamicQuantizeLinear"]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    onnx.save(proto, str(plain))
    assert batch_invariant(plain)

    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(48)]
    model = server.Model(bundle, 1)
    model.warm_up()
    alone = {t: model.predict([t])["embeddings"][0] for t in texts}
    # auto: this model's answers depend on what shares a run, so requests are never mixed: each is its answer alone
    assert Client(port).request("GET", "/metadata")[1]["batching"]["across_requests"] is False
    got = _sixteen_clients(port, texts)
    assert max(float(np.abs(np.subtract(got[t], alone[t])).max()) for t in texts) < 1e-6
    assert _runs(port) >= len(texts)

    mixed = free_port()  # asked for: texts of concurrent requests run together, close to (not equal to) alone
    proc = start_server(bundle, mixed, "--batch-across-requests", "on", "--threads", "1")
    try:
        got = _sixteen_clients(mixed, texts)
        assert min(cosine(got[t], alone[t]) for t in texts) > 0.99
        runs = _runs(mixed)
        assert runs < len(texts), f"{runs} runs for {len(texts)} concurrent requests: nothing was batched"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_sigterm_answers_what_was_accepted_and_exits_0(bundle: Path) -> None:
    port = free_port()
    proc = start_server(bundle, port, "--max-batch", "1")
    long_body = json.dumps({"texts": [" ".join(TEXTS)] * 8, "truncate": True}).encode()
    held = socket.create_connection(("127.0.0.1", port), timeout=20)
    held.sendall(post(port, "/v1/predict", long_body)[:-10])  # in flight: the body is still coming
    time.sleep(0.3)
    results: list[int] = []

    def burst() -> None:
        for _ in range(20):
            try:
                results.append(raw(port, post(port, "/v1/predict", long_body))[0])
            except OSError:  # refused once the server stopped accepting
                results.append(0)

    thread = threading.Thread(target=burst)
    thread.start()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    held.sendall(long_body[-10:])
    answer = b""
    while b"}" not in answer[-3:]:
        chunk = held.recv(65536)
        if not chunk:
            break
        answer += chunk
    thread.join()
    assert b" 200 " in answer.split(b"\r\n")[0] and b"embeddings" in answer
    assert proc.wait(timeout=30) == 0
    assert set(results) <= {200, 0} and 200 in results, results  # answered, or refused: never an error
    assert "Traceback" not in proc.log.read_text() and "terminate called" not in proc.log.read_text()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/healthz")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-batch", "0"], "--max-batch must be positive"),
        (["--header-timeout", "-1"], "--header-timeout must be positive"),
        (["--batch-across-requests", "maybe"], "invalid choice"),
        (["--api-key", "secret"], "unrecognized arguments: --api-key"),  # keys never on the command line
    ],
)
def test_bad_server_options_are_one_line_and_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        server.main(["--model", "nowhere", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_an_unreadable_or_empty_key_file_is_refused(bundle: Path, tmp_path: Path, capsys: Any) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n")
    for path, needle in ((empty, "holds no key"), (tmp_path / "missing", "cannot be read")):
        assert server.main(["--model", str(bundle), "--api-key-file", str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_push_needs_an_image_whose_name_starts_with_a_registry(tmp_path: Path) -> None:
    from tests.test_cli import assert_user_error, cli

    assert_user_error(cli("package", str(tmp_path), "--push"), "--push needs --image")
    assert_user_error(cli("package", str(tmp_path), "--image", "minilm:1", "--push"), "names no registry")

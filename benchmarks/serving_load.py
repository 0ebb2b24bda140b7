"""Benchmark: the server under load (issue 26), against the server it replaced, side by side.

    .venv/bin/python benchmarks/serving_load.py [--requests 160] [--rounds 3] [--slow-seconds 60]

It runs recipes/minilm-int8.yaml (finished stages are reused) and packages it, then serves the bundle twice on
loopback, 2 ONNX Runtime threads each: this checkout's server (ASGI on uvicorn, dynamic batching) and the
server it replaced (`http.server`, one request at a time), taken from git at BASELINE. One Lee document per
request, cut at 128 tokens. Interleaved round by round, each from a second process:

- one client, one request at a time on a keep-alive connection (p50, p99);
- 16 concurrent clients (throughput, p50, p99), and how close a batched answer is to the text alone;
- (once per server) 8 slow clients sending their headers one byte a second for --slow-seconds, beside one
  normal client: its p99 against its p99 without them, and its errors;
- memory: the server's RSS after the load, after one request of 64 texts x 16 KB, and after 200 more
  ordinary requests, against ONNX Runtime's own footprint (a process that only loads the model and runs it).

Writes benchmarks/results/serving_load.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.data.cache import write_atomic  # noqa: E402
from compress.data.reference import lee  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from compress.serving.bundle import write_bundle  # noqa: E402
from compress.targets.native import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serving_load.md"
BASELINE = "53a84fb"  # the last commit with the http.server server
THREADS = 2
LOAD = r"""
import http.client, json, sys, threading, time
port, clients, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
texts = json.loads(sys.stdin.read())
lat, bad, answers = [], [0], {}
def client(k):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(k, n, clients):
        body = json.dumps({"texts": [texts[i % len(texts)]], "truncate": True})
        t = time.perf_counter()
        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse(); data = answer.read()
        lat.append((time.perf_counter() - t) * 1000.0)
        if answer.status != 200:
            bad[0] += 1
        elif i < len(texts):
            answers[i] = json.loads(data)["embeddings"][0]
start = time.perf_counter()
threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"seconds": time.perf_counter() - start, "latency_ms": lat, "bad": bad[0], "answers": answers}))
"""
SLOW = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
request = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 200
start, i, cut = time.time(), 0, 0
while time.time() - start < seconds:
    for k, s in enumerate(socks):
        try:
            s.sendall(request[i % len(request): i % len(request) + 1])
        except OSError:  # the server cut it (header deadline): a new slow client takes its place
            cut += 1
            socks[k] = socket.create_connection(("127.0.0.1", port))
    i += 1
    time.sleep(1.0)
print(cut)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def baseline_server(folder: Path) -> Path:
    """The server this work replaced, from git (it runs beside its two helper modules)."""
    for name in ("server.py", "bundle_check.py", "model_inputs.py"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BASELINE}:compress/serving/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (folder / name).write_text(text)
    return folder / "server.py"


def start(script: Path, bundle: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, str(script), "--model", str(bundle), "--host", "127.0.0.1", "--port", str(port), *extra]
    with log.open("ab") as sink:
        proc = subprocess.Popen([*cmd, "--threads", str(THREADS)], stdout=subprocess.PIPE, stderr=sink)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("serving"):
        raise SystemExit(f"{script} did not start: {log.read_text()[-500:]}")
    return proc, port


def load(port: int, texts: list[str], clients: int, n: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", LOAD, str(port), str(clients), str(n)]
    proc = subprocess.run(cmd, input=json.dumps(texts), capture_output=True, text=True, check=True)
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024.0


def ort_footprint(bundle: Path, texts: list[str]) -> float:
    """RSS (MB) of a process that loads the model in ONNX Runtime and runs it on the same texts."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from compress.serving.server import Model
import onnxruntime as ort
from compress.serving.model_inputs import Request, encode
model = Model(__import__("pathlib").Path({str(bundle)!r}), {THREADS})
texts = json.loads(sys.stdin.read())
feeds = [encode(model.encoder, Request([t], True, "texts"), "text", model.inputs, model.max_length).feeds
         for t in texts]
del model
so = ort.SessionOptions(); so.intra_op_num_threads = {THREADS}
session = ort.InferenceSession({str(bundle / "model.onnx")!r}, so, providers=["CPUExecutionProvider"])
for _ in range(3):
    for f in feeds:
        session.run(None, f)
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True, check=True
    )
    return int(proc.stdout.strip()) / 1024.0


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def memory(proc: subprocess.Popen[bytes], port: int, texts: list[str]) -> dict[str, float]:
    """RSS after the load, after one request of 64 texts of 16 KB, and after 200 ordinary ones again."""
    import http.client

    after_load = rss_mb(proc.pid)
    big = json.dumps({"texts": [(" ".join(texts))[:16000]] * 64, "truncate": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    conn.request("POST", "/v1/predict", body=big, headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    big_s = time.perf_counter() - t
    after_big = rss_mb(proc.pid)
    load(port, texts, 1, 200)
    return {"load": after_load, "big": after_big, "again": rss_mb(proc.pid), "big_s": big_s, "status": answer.status}


def slow_round(port: int, texts: list[str], seconds: float) -> dict[str, Any]:
    quiet = load(port, texts, 1, 100)
    slow = subprocess.Popen([sys.executable, "-c", SLOW, str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    lat, bad = [], 0
    while slow.poll() is None:
        out = load(port, texts, 1, 50)
        lat += out["latency_ms"]
        bad += out["bad"]
    cut = int((slow.stdout.read() if slow.stdout else "0").strip() or 0)
    return {
        "quiet_p99": float(np.percentile(quiet["latency_ms"], 99)),
        "p99": float(np.percentile(lat, 99)),
        "bad": bad,
        "requests": len(lat),
        "cut": cut,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=160, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-seconds", type=float, default=60.0)
    args = parser.parse_args()
    os.chdir(ROOT)
    run_dir = run(load_recipe(Path("recipes/minilm-int8.yaml")))
    bundle = run_dir / "package"
    write_bundle(run_dir, bundle)
    texts = list(lee().texts)
    work = Path(tempfile.mkdtemp(prefix="serving-load-"))
    now = ROOT / "compress" / "serving" / "server.py"
    servers: dict[str, tuple[Path, list[str]]] = {
        "before": (baseline_server(work), []),
        "now": (now, []),
        "now, --batch-across-requests on": (now, ["--batch-across-requests", "on"]),
    }
    procs = {k: start(v, bundle, work / f"{k[:3]}{len(k)}.log", *extra) for k, (v, extra) in servers.items()}
    sys.path.insert(0, str(ROOT / "compress" / "serving"))
    from compress.serving.server import Model

    model = Model(bundle, THREADS)
    alone = [model.predict([t], truncate=True)["embeddings"][0] for t in texts]
    del model
    results: dict[str, dict[str, list[Any]]] = {k: {"one": [], "sixteen": []} for k in servers}
    try:
        for _, port in procs.values():
            load(port, texts, 4, 40)  # warm
        for r in range(args.rounds):
            for k, (_, port) in procs.items():
                results[k]["one"].append(load(port, texts, 1, args.requests))
                results[k]["sixteen"].append(load(port, texts, 16, args.requests))
            print(f"round {r + 1}/{args.rounds}", flush=True)
        pair = {k: procs[k] for k in ("before", "now")}  # the mixed-batching server adds nothing here
        slow = {k: slow_round(port, texts, args.slow_seconds) for k, (_, port) in pair.items()}
        mem = {k: memory(proc, port, texts) for k, (proc, port) in pair.items()}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    ort_mb = ort_footprint(bundle, texts)
    report(args, results, slow, mem, {"ort_mb": ort_mb, "alone": alone, "bundle": str(bundle)})


def _stats(rounds: list[dict[str, Any]]) -> dict[str, float]:
    lat = np.concatenate([r["latency_ms"] for r in rounds])
    return {
        "rps": float(np.median([len(r["latency_ms"]) / r["seconds"] for r in rounds])),
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "bad": float(sum(r["bad"] for r in rounds)),
    }


def report(args: Any, results: Any, slow: Any, mem: Any, extra: dict[str, Any]) -> None:
    ort_mb, alone, bundle = extra["ort_mb"], extra["alone"], extra["bundle"]
    one = {k: _stats(v["one"]) for k, v in results.items()}
    many = {k: _stats(v["sixteen"]) for k, v in results.items()}
    mixed = "now, --batch-across-requests on"
    batched = {
        k: [cosine(v, alone[int(i)]) for r in results[k]["sixteen"] for i, v in r["answers"].items()]
        for k in ("now", mixed)
    }
    lines = [
        "# The server under load: this server against the one it replaced",
        "",
        f"`.venv/bin/python benchmarks/serving_load.py {' '.join(sys.argv[1:])}` on {cpu_model()}, "
        f"{datetime.now(UTC):%Y-%m-%d}. int8 all-MiniLM-L6-v2 ({bundle}), {THREADS} ONNX Runtime threads, one Lee "
        f"document per request (cut at 128 tokens), {args.rounds} interleaved rounds of {args.requests} requests. "
        f'"before" is `compress/serving/server.py` at {BASELINE} (http.server, one request at a time). The load '
        "generator runs in a second process on the same 2 cores.",
        "",
        "| server | 1 client p50 ms | 1 client p99 ms | 16 clients req/s | 16 clients p50 ms | 16 clients p99 ms "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in results:
        lines.append(
            f"| {k} | {one[k]['p50']:.2f} | {one[k]['p99']:.2f} | {many[k]['rps']:.1f} | {many[k]['p50']:.2f} | "
            f"{many[k]['p99']:.2f} | {int(one[k]['bad'] + many[k]['bad'])} |"
        )
    lines += [
        "",
        f"- 16 clients: now **{many['now']['rps'] / many['before']['rps']:.3f}x** the throughput of before, with "
        f"batching across requests **{many[mixed]['rps'] / many['before']['rps']:.3f}x** (target 1.5x, "
        f"not rounded); one client's p50 **{one['now']['p50'] / one['before']['p50']:.2f}x** before's "
        "(target within 1.10x).",
        *[
            f"- Answers under 16 clients against each text alone, {k}: min cosine {min(v):.5f}, median "
            f"{np.median(v):.5f} over {len(v)} answers."
            for k, v in batched.items()
        ],
        "",
        "| server | slow clients | normal client p99 quiet ms | p99 beside 8 slow clients ms | ratio | errors | "
        "slow connections cut |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in slow.items():
        lines.append(
            f"| {k} | 8 x 1 byte/s, {args.slow_seconds:.0f} s | {s['quiet_p99']:.2f} | {s['p99']:.2f} | "
            f"{s['p99'] / s['quiet_p99']:.2f}x | {s['bad']} of {s['requests']} | {s['cut']} |"
        )
    lines += [
        "",
        "| server | RSS after the load MB | after 64 x 16 KB texts MB | 200 requests later MB | the big request s |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {m['load']:.0f} | {m['big']:.0f} | {m['again']:.0f} | {m['big_s']:.2f} (HTTP {m['status']}) |"
            for k, m in mem.items()
        ],
        "",
        f"- ONNX Runtime's own footprint for the model (a process that loads it and runs the same texts): "
        f"{ort_mb:.0f} MB; this server after the load: {mem['now']['load'] / ort_mb:.2f}x (target within 1.5x).",
        "",
    ]
    text = "\n".join(lines)
    write_atomic(RESULTS, text.encode())
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark: the int8 MiniLM served over HTTP, beside ONNX Runtime in-process, natively and in its image.

    .venv/bin/python benchmarks/serving.py [--requests 200] [--rounds 3]   (root: it starts a private dockerd)

It runs recipes/minilm-int8.yaml (finished stages are reused), packages the run, builds the amd64 and
arm64 model images on a private Docker engine, and measures, interleaved round by round, with 2 ONNX
Runtime threads and one text (a Lee document, cut at 128 tokens) per call:

- ORT in-process: session.run on pre-tokenized inputs (what the server can at best reach);
- in-process, tokenizer + ORT: the server's own Model.predict, without HTTP;
- the server, native: `server.py` on loopback, a second process sending requests on one keep-alive
  connection (the load generator shares the 2 cores with the server);
- the server in the amd64 image, the same way: the container shares the host's network (the engine
  has no bridge) and its server listens on 127.0.0.1 only, never beyond loopback.

Then: container start to first answer (median of 5), and the image sizes. Writes
benchmarks/results/serving.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.container import images  # noqa: E402
from compress.container.engine import Engine  # noqa: E402
from compress.data.cache import write_atomic  # noqa: E402
from compress.data.reference import lee  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from compress.serving import model_inputs  # noqa: E402
from compress.serving.bundle import write_bundle  # noqa: E402
from compress.serving.server import Model  # noqa: E402
from compress.targets.docker import run_flags  # noqa: E402
from compress.targets.native import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serving.md"
THREADS, SEQ = 2, 128
LOAD = """
import http.client, json, sys, time
port, texts, n = int(sys.argv[1]), json.loads(sys.stdin.read()), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
lat, bad = [], 0
start = time.perf_counter()
for i in range(n):
    body = json.dumps({"texts": [texts[i % len(texts)]], "truncate": True})
    t = time.perf_counter()
    conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
    answer = conn.getresponse(); answer.read()
    lat.append((time.perf_counter() - t) * 1000.0); bad += answer.status != 200
print(json.dumps({"seconds": time.perf_counter() - start, "latency_ms": lat, "bad": bad}))
"""


def load(port: int, texts: list[str], n: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", LOAD, str(port), str(n)]
    proc = subprocess.run(cmd, input=json.dumps(texts), capture_output=True, text=True, check=True)
    out: dict[str, Any] = json.loads(proc.stdout)
    if out["bad"]:
        raise SystemExit(f"{out['bad']} requests failed on port {port}")
    return out


def in_process(call: Any, n: int) -> dict[str, Any]:
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        call(i)
        lat.append((time.perf_counter() - t) * 1000.0)
    return {"seconds": time.perf_counter() - start, "latency_ms": lat}


def wait_ready(port: int, timeout: float = 120) -> float:
    import http.client

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing answered on port {port} in {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def images_for(folder: Path, env: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """The amd64 and arm64 model images of the bundle, and the sizes of those and of the runtime images."""
    tags = {}
    for arch in ("amd64", "arm64"):
        tag = images.arch_tag("edge-compress-bench/minilm:int8", arch)
        tags[arch] = images.build_model_image(folder, tag, arch, env, print)

    def size(tag: str) -> float:
        return int(images.docker(["image", "inspect", "-f", "{{.Size}}", tag], env, "inspect")) / 1e6

    return tags, {tag: size(tag) for tag in (images.runtime_tag("amd64"), images.runtime_tag("arm64"), *tags.values())}


def container(env: dict[str, str], tag: str, port: int, *extra: str, arch: str = "amd64") -> str:
    """`tag`'s server on 127.0.0.1:`port` (the host's network, loopback only: nothing is published)."""
    args = ["run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}", *run_flags(arch), tag]
    return images.docker([*args, "--host", "127.0.0.1", *extra], env, "run").strip()


def throughput(folder: Path, texts: list[str], tag: str, env: dict[str, str], args: Any) -> dict[str, list[Any]]:
    """Interleaved rounds: default ORT session, the server's Model.predict, the server natively and in the image."""
    import onnxruntime as ort

    model = Model(folder, THREADS)
    so = ort.SessionOptions()  # what a user would write: defaults, the thread count fixed
    so.intra_op_num_threads = THREADS
    plain = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = [
        model_inputs.pad(model.tokenize(model_inputs.Request([t], True, "texts")), model.inputs, model.encoder.pad_id)
        for t in texts
    ]
    for f in feeds[:5]:
        plain.run(None, f)
    native_port, docker_port = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "compress/serving/server.py"), "--model", str(folder), "--host", "127.0.0.1"]
    server = subprocess.Popen([*cmd, "--port", str(native_port), "--threads", str(THREADS)], stdout=subprocess.DEVNULL)
    cid = container(env, tag, docker_port, "--threads", str(THREADS))
    samples: dict[str, list[Any]] = {k: [] for k in ("ort", "predict", "server", "container")}
    try:
        wait_ready(native_port)
        wait_ready(docker_port)
        load(native_port, texts, 20)
        load(docker_port, texts, 20)
        for r in range(args.rounds):
            samples["ort"].append(in_process(lambda i: plain.run(None, feeds[i % len(feeds)]), args.requests))
            samples["predict"].append(in_process(lambda i: model.predict([texts[i % len(texts)]], True), args.requests))
            samples["server"].append(load(native_port, texts, args.requests))
            samples["container"].append(load(docker_port, texts, args.requests))
            print(f"round {r + 1}/{args.rounds}", flush=True)
    finally:
        server.terminate()
        images.docker(["stop", cid], env, "stop")
    return samples


def start_times(env: dict[str, str], tags: dict[str, str]) -> tuple[list[float], float]:
    """Seconds from `docker run` to the first /healthz 200: five amd64 starts, one emulated arm64 start."""
    starts = []
    for _ in range(5):
        port = free_port()
        begin = time.perf_counter()
        cid = container(env, tags["amd64"], port)
        wait_ready(port)
        starts.append(time.perf_counter() - begin)
        images.docker(["stop", cid], env, "stop")
    port = free_port()
    begin = time.perf_counter()
    cid = container(env, tags["arm64"], port, arch="arm64")
    wait_ready(port)
    arm = time.perf_counter() - begin
    images.docker(["stop", cid], env, "stop")
    return starts, arm


def summary(rounds: list[dict[str, Any]]) -> dict[str, float]:
    per_round = [len(s["latency_ms"]) / s["seconds"] for s in rounds]
    lat = np.concatenate([s["latency_ms"] for s in rounds])
    return {
        "rps": float(np.median(per_round)),
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }


NAMES = {
    "ort": "ORT in-process, default session (pre-tokenized)",
    "predict": "in-process, tokenizer + ORT (the server's Model.predict)",
    "server": "HTTP server, native (load from a 2nd process)",
    "container": "HTTP server in the amd64 image (load from a 2nd process)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.chdir(ROOT)
    run_dir = run(load_recipe(Path("recipes/minilm-int8.yaml")))
    folder = run_dir / "package"
    bundle = write_bundle(run_dir, folder)
    texts = list(lee().texts)
    engine = Engine(images.build_root() / "engine")
    engine.start(print)
    env = engine.env()
    tags, sizes = images_for(folder, env)
    samples = throughput(folder, texts, tags["amd64"], env, args)
    starts, arm_start = start_times(env, tags)
    stopped = engine.stop()

    rows = {k: summary(v) for k, v in samples.items()}
    base = rows["ort"]["rps"]
    lines = [
        "# Serving the int8 all-MiniLM-L6-v2",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/serving.py', *sys.argv[1:]])}` on {cpu_model()}, "
        f"{datetime.now(UTC):%Y-%m-%d}. One Lee document per request (cut at {SEQ} tokens), {THREADS} ONNX Runtime "
        f"threads, {args.rounds} interleaved rounds of {args.requests} requests; throughput is the median round, "
        "latency percentiles over all requests. The load generator shares the machine's 2 cores with the server.",
        "",
        "| variant | throughput req/s | vs ORT in-process | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for key, name in NAMES.items():
        row = rows[key]
        lines.append(f"| {name} | {row['rps']:.1f} | {row['rps'] / base:.0%} | {row['p50']:.2f} | {row['p99']:.2f} |")
    lines += [
        "",
        "| image | size MB |",
        "|---|---|",
        *[f"| {tag} | {mb:.0f} |" for tag, mb in sizes.items()],
        "",
        f"- Container start to first answer (amd64, `docker run` to /healthz 200): median {np.median(starts):.2f} s "
        f"of 5 (min {min(starts):.2f}, max {max(starts):.2f}).",
        f"- arm64 image under qemu (EMULATED, not a device figure): {arm_start:.1f} s to first answer.",
        f"- Model: sha256 {bundle['model_sha256'][:12]}, {bundle['model_bytes'] / 1e6:.1f} MB; engine stop: "
        f"{'; '.join(stopped) if stopped else 'nothing to remove, host networking as at start'}.",
        "",
    ]
    text = "\n".join(lines)
    write_atomic(RESULTS, text.encode())
    print(text)


if __name__ == "__main__":
    main()

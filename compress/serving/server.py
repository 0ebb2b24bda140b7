"""The inference server of a packaged model: server.py and the modules beside it, with numpy, onnxruntime,
tokenizers, uvicorn (h11) and prometheus_client.

    python server.py --model BUNDLE [--host 0.0.0.0] [--port 8080] [--threads N]

BUNDLE is what `edge-compress package` writes: model.onnx, tokenizer/ and metadata.json. The same files run in
the runtime images (no edge-compress, no PyTorch) and natively (`edge-compress serve`). Before loading,
metadata.json's fields are checked and every file it lists must have its packaged sha256; a bundle that fails
is one "error: ..." line on stderr and exit code 2.

Routes (protocols.py; each answers the model's task, or 404 with the route that does):

    POST /v1/predict            our own: {"texts": [...]} (pairs, words) -> embeddings, labels and scores, tags
    POST /v1/embeddings         OpenAI's embeddings API (embedding models)
    POST /embed /predict /rerank  text-embeddings-inference's (embeddings; text or pair classifiers; pairs)
    /v2/...                     Open Inference Protocol v2 (KServe, Triton): health, model metadata, infer
    GET  /healthz /metadata /metrics   liveness, what is served (model hash, recipe, metrics), Prometheus

Concurrent requests are batched (batcher.py): their texts run together, sorted by length, in bounded batches,
on one inference thread with every core. Limits, API keys, the access log: http_app.py; header deadlines
and malformed HTTP: transport.py. SIGTERM stops accepting, answers what was accepted and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn

if __package__:  # imported: `edge-compress serve`, the packager
    from compress.serving.bundle_check import (
        FORMAT,
        VARIANT_FILES,
        BundleError,
        first_line,
        host_family,
        load_metadata,
        pick_variant,
        sha256_of,
    )
    from compress.serving.model_inputs import (
        FIELD,
        WARM_UP,
        ByteEncoder,
        Request,
        Row,
        TokenizerEncoder,
        pad,
        tag_words,
        tokenize,
        word_starts,
    )
else:  # run as a script (natively or in the runtime images): bundle_check.py and model_inputs.py sit beside it
    from bundle_check import (  # type: ignore[import-not-found,no-redef]
        FORMAT,
        VARIANT_FILES,
        BundleError,
        first_line,
        host_family,
        load_metadata,
        pick_variant,
        sha256_of,
    )
    from model_inputs import (  # type: ignore[import-not-found,no-redef]
        FIELD,
        WARM_UP,
        ByteEncoder,
        Request,
        Row,
        TokenizerEncoder,
        pad,
        tag_words,
        tokenize,
        word_starts,
    )

__all__ = ["FORMAT", "BundleError", "Model", "main", "sha256_of"]
LIBRARY_ENV = "EDGE_COMPRESS_OPS_LIBRARY"  # the native kernels of our attention ops, for models that use them
TRIM_TOKENS = 1024  # after a run of at least this many padded tokens, freed memory goes back to the system
FAMILY_ENV = "EDGE_COMPRESS_CPU_FAMILY"  # serve this CPU family's variant instead of the one the CPU's flags pick


def choose_model(folder: Path, meta: dict[str, Any], family: str | None) -> tuple[Path, dict[str, Any], dict | None]:
    """(the model file, its session settings, the variant chosen or None) of a bundle; a bundle of variants
    serves the one of this CPU's family (or of `family`), and refuses a family it holds none of."""
    if "variants" not in meta:
        return folder / "model.onnx", meta.get("session", {}), None
    if family is not None:
        variant = pick_variant(meta, family, f"asked for with --cpu-family or ${FAMILY_ENV}")
    else:
        variant = pick_variant(meta, *host_family())
    return folder / variant["file"], variant.get("session", {}), variant


class Model:
    """The bundle's ONNX model behind its tokenizer: texts (pairs, words) in, task outputs out."""

    def __init__(self, folder: Path, threads: int, library: str | None = None, family: str | None = None) -> None:
        import numpy as np
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # warnings such as "Failed to persist telemetry" on a read-only root
        self.np = np
        self.meta: dict[str, Any] = load_metadata(folder)
        model, settings, self.variant = choose_model(folder, self.meta, family)
        self.task: str = self.meta["task"]
        self.inputs: list[str] = list(self.meta["inputs"])
        self.max_length: int = int(self.meta["max_length"])
        self.labels: list[str] | None = self.meta.get("labels")
        self.input_kind: str = self.meta.get("input_kind", "text")  # bundles before pairs and words: text
        self.encoder: ByteEncoder | TokenizerEncoder = (
            ByteEncoder()
            if self.meta["tokenizer"] == "bytes"
            else TokenizerEncoder(folder / "tokenizer", self.max_length)
        )
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # No arena: ONNX Runtime's CPU arena keeps the peak of the largest run for good (a batch of 32 texts
        # left 290 MB where single texts need 141 MB; without it 145 MB, and the same speed: measured).
        so.enable_cpu_mem_arena = False
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Intra-op threads spin during a run (fast kernels), and stop when it ends: between two requests the
        # cores belong to the HTTP thread, the tokenizer and the client (measured: benchmarks/serving.py).
        so.add_session_config_entry("session.force_spinning_stop", "1")
        for key, value in settings.get("config_entries", {}).items():
            so.add_session_config_entry(key, str(value))
        self.library_isa: str | None = None
        if self.meta.get("custom_ops"):
            library = library or os.environ.get(LIBRARY_ENV)
            if not library or not Path(library).is_file():
                raise BundleError(
                    f"the model uses {', '.join(self.meta['custom_ops'])} and no native kernel library was given "
                    f"(--ops-library or ${LIBRARY_ENV}); the runtime images carry it"
                )
            try:
                so.register_custom_ops_library(library)
            except Exception as exc:
                raise BundleError(f"{library}: ONNX Runtime cannot load the kernels ({first_line(exc)})") from None
            self.library_isa = library_isa(library)
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(model),
                so,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(settings.get("disabled_optimizers", [])),
            )
        except Exception as exc:  # onnxruntime's own types: InvalidProtobuf, Fail, InvalidGraph...
            raise BundleError(f"{model}: ONNX Runtime cannot load it ({first_line(exc)})") from None
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.sha256: str = self.variant["sha256"] if self.variant else self.meta["model_sha256"]
        self.threads = threads
        self.trim = malloc_trim()
        recorded = (self.variant or {}).get("batch_invariant", self.meta.get("batch_invariant"))
        # bundles before the field: an int8 model may be dynamic, so it is taken as batch-dependent
        self.batch_invariant: bool = bool(recorded) if recorded is not None else self.meta.get("precision") != "int8"
        self.width = 0  # an output's last dimension: set by warm_up
        self.lock = threading.Lock()
        self.runtime = {
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": threads,
            "custom_ops_library_isa": self.library_isa,
        }

    def warm_up(self) -> None:
        """The first answer should not pay for lazy initialisation; a model that cannot answer is not served."""
        try:
            out = self.np.stack(self.run_batch(self.tokenize(Request([WARM_UP[self.input_kind]], True, "texts"))))
        except Exception as exc:
            raise BundleError(f"the model fails on a first request: {type(exc).__name__}: {first_line(exc)}") from None
        self.width = int(out.shape[-1])
        if self.labels and self.task != "embedding" and out.shape[-1] != len(self.labels):
            raise BundleError(
                f"metadata.json names {len(self.labels)} labels but the model scores {out.shape[-1]}; "
                "re-package the run"
            )

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "model")

    @property
    def dimensions(self) -> int:
        """An embedding's width (from the warm-up run)."""
        return self.width

    def tokenize(self, request: Request) -> list[Row]:
        """Each example's tokens (a 413 BadRequest for one too long, unless the request allows cutting)."""
        return tokenize(self.encoder, request, self.input_kind, self.max_length)

    def run_batch(self, rows: list[Row]) -> list[Any]:
        """One ONNX Runtime run over these rows, padded to the longest: each row's raw output (an embedding,
        a classifier's logits, a tagger's logits per token of the row)."""
        feeds = pad(rows, self.inputs, self.encoder.pad_id)
        with self.lock:
            out = self.session.run(None, feeds)[0]
            if self.trim is not None and feeds["input_ids"].size >= TRIM_TOKENS:
                self.trim(0)  # glibc keeps freed activations in its heap: hand a large run's back to the system
        if out.ndim == 3:
            return [out[i, : len(ids)] for i, (ids, _, _) in enumerate(rows)]
        return list(out)

    def probabilities(self, logits: Any) -> Any:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return self.np.exp(shifted) / self.np.exp(shifted).sum(axis=-1, keepdims=True)

    def result(self, request: Request, rows: list[Row], outputs: list[Any]) -> dict[str, Any]:
        """The /v1/predict answer from each row's raw output."""
        result: dict[str, Any] = {"tokens": [len(ids) for ids, _, _ in rows]}
        if self.task == "embedding":
            result["embeddings"] = self.np.stack(outputs).astype(float).tolist()
            return result
        if self.input_kind == "words":
            scores = [self.probabilities(row) for row in outputs]  # (S, L) per sentence
            result.update(tag_words(scores, word_starts(rows, request), self.labels))
            if request.split:  # the words the tags belong to, as the texts were split
                result["words"] = [list(words) for words in request.examples]
            return result
        scores = self.probabilities(self.np.stack(outputs))
        picks = scores.argmax(axis=-1).tolist()
        result["labels"] = [self.labels[p] if self.labels else p for p in picks]
        result["scores"] = scores.astype(float).tolist()
        return result

    def predict(self, examples: list[Any], truncate: bool = False) -> dict[str, Any]:
        """The task's answer for examples of the model's input kind (texts, (first, second) pairs, word tuples)."""
        return self.answer(Request(list(examples), truncate, FIELD[self.input_kind]))

    def answer(self, request: Request) -> dict[str, Any]:
        rows = self.tokenize(request)
        return self.result(request, rows, self.run_batch(rows))

    def metadata(self) -> dict[str, Any]:
        """What GET /metadata shows: the bundle's metadata, the runtime and the variant that answers."""
        meta = dict(self.meta)
        meta["runtime"] = self.runtime
        if self.variant is not None:  # which CPU family's int8 model answers, and why that one
            meta["variant"] = {k: self.variant[k] for k in ("family", "file", "sha256", "chosen_by")}
        return meta


def malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another C library)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def library_isa(path: str) -> str | None:
    import ctypes

    try:
        lib = ctypes.CDLL(path)
        lib.EdgeCompressOpsIsa.restype = ctypes.c_char_p
        return str(lib.EdgeCompressOpsIsa().decode())
    except (OSError, AttributeError):
        return None


def healthcheck(port: int) -> int:
    """The image's HEALTHCHECK: 0 when the server on this port answers /healthz with 200."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as answer:
            return 0 if answer.status == HTTPStatus.OK else 1
    except OSError:
        return 1


KEYS_ENV = "EDGE_COMPRESS_API_KEYS"  # API keys, comma-separated (or one per line in --api-key-file)
KEY_FILE_ENV = "EDGE_COMPRESS_API_KEY_FILE"


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one "error: ..." line and exit 2, as every other refusal of the server."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description="Serve a packaged edge-compress model over HTTP.", allow_abbrev=False)
    add = parser.add_argument
    add("--model", default=os.environ.get("EDGE_COMPRESS_MODEL", "/model"), help="the bundle folder")
    add("--host", default="0.0.0.0")
    add("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime intra-op threads")
    add("--ops-library", default=None, help=f"native kernels of our attention ops (default ${LIBRARY_ENV})")
    add(
        "--cpu-family",
        choices=sorted(VARIANT_FILES),
        default=os.environ.get(FAMILY_ENV) or None,
        help=f"a bundle of variants: serve this family's (default: this CPU's, from its flags; ${FAMILY_ENV})",
    )
    add("--max-body-bytes", type=int, default=1 << 20, help="a larger body is refused (413)")
    add("--max-texts", type=int, default=64, help="texts (pairs, sentences) in one request; more: 413")
    add("--max-concurrent", type=int, default=64, help="model requests in flight; more: 429 with Retry-After")
    add("--max-connections", type=int, default=512, help="open connections; a request on one more: 503")
    add("--max-header-bytes", type=int, default=16384, help="request line and headers; more: 431 (or 400)")
    add("--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive; then 408")
    add("--request-timeout", type=float, default=30.0, help="seconds for a request's body to arrive; then 408")
    add("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    add("--batch-wait-ms", type=float, default=0.0, help="how long an idle model waits to batch more requests")
    add("--max-batch", type=int, default=32, help="examples in one ONNX Runtime run")
    add("--max-batch-tokens", type=int, default=2048, help="examples x padded tokens in one run")
    add(
        "--batch-across-requests",
        choices=("auto", "on", "off"),
        default="auto",
        help="run texts of different requests together (auto: when the model answers the same either way)",
    )
    add("--max-queue", type=int, default=1024, help="examples waiting for a run; more: 429")
    add("--rerank-label", default=None, help="a pair classifier of several labels: /rerank ranks by this one")
    add("--api-key-file", default=os.environ.get(KEY_FILE_ENV), help=f"API keys, one per line (${KEYS_ENV})")
    add("--access-log", action=argparse.BooleanOptionalAction, default=True, help="one JSON line per request")
    add("--healthcheck", action="store_true", help="ask a running server's /healthz (exit 0 or 1)")
    args = parser.parse_args(argv)
    positive = ["max_body_bytes", "max_texts", "max_concurrent", "max_connections", "max_header_bytes"]
    positive += ["header_timeout", "request_timeout", "keep_alive", "max_batch", "max_batch_tokens", "max_queue"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms must be 0 or more, not {args.batch_wait_ms}")
    return args


def api_keys(file: str | None) -> tuple[str, ...]:
    """The API keys from --api-key-file or $EDGE_COMPRESS_API_KEYS (never from the command line: argv is
    visible to every user of the machine); none: the server is open."""
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{file}: the API key file cannot be read ({first_line(exc)})") from None
        keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        if not keys:
            raise BundleError(f"{file}: the API key file holds no key")
        return keys
    return tuple(k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip())


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.healthcheck:
        return healthcheck(args.port)
    try:
        keys = api_keys(args.api_key_file)
        model = Model(Path(args.model), max(1, args.threads), args.ops_library, args.cpu_family)
        model.warm_up()
        if args.rerank_label is not None and args.rerank_label not in (model.labels or []):
            raise BundleError(f"--rerank-label {args.rerank_label!r} is not a label of this model: {model.labels}")
    except (BundleError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
        return 2
    return serve(model, args, keys, sock)


def _after_shutdown(signum: int, frame: Any) -> None:
    """uvicorn raises the signal it shut down on again once it is done; by then there is nothing left to do."""


def serve(model: Model, args: argparse.Namespace, keys: tuple[str, ...], sock: socket.socket) -> int:
    """Run the ASGI app on uvicorn until SIGTERM or SIGINT: then stop accepting, answer what was accepted
    (for up to 30 s), stop the inference thread and return 0."""
    import logging

    import uvicorn

    if __package__:
        from compress.serving.batcher import BatchSettings
        from compress.serving.http_app import App, Limits
        from compress.serving.protocols import routes
        from compress.serving.transport import GuardedH11Protocol
    else:
        from batcher import BatchSettings  # type: ignore[import-not-found,no-redef]
        from http_app import App, Limits  # type: ignore[import-not-found,no-redef]
        from protocols import routes  # type: ignore[import-not-found,no-redef]
        from transport import GuardedH11Protocol  # type: ignore[import-not-found,no-redef]

    limits = Limits(
        args.max_body_bytes,
        args.max_texts,
        args.max_concurrent,
        args.request_timeout,
        keys,
        args.access_log,
        args.rerank_label,
        args.max_header_bytes,
    )
    across = {"on": True, "off": False}.get(args.batch_across_requests, model.batch_invariant)
    batching = BatchSettings(args.max_batch, args.max_batch_tokens, args.batch_wait_ms, args.max_queue, across)
    app = App(model, limits, batching, routes())
    GuardedH11Protocol.header_timeout_s = args.header_timeout
    GuardedH11Protocol.max_header_bytes = args.max_header_bytes
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # our access log is one JSON line per request
        logging.getLogger(name).setLevel(logging.ERROR)
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol,
        ws="none",
        lifespan="on",
        interface="asgi3",
        loop="asyncio",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=max(1, round(args.keep_alive)),
        limit_concurrency=args.max_connections,
        h11_max_incomplete_event_size=args.max_header_bytes,
        timeout_graceful_shutdown=30,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)
    host, port = sock.getsockname()[:2]
    print(
        f"serving {model.name} ({model.task}, sha256 {model.sha256[:12]}"
        + (f", {model.variant['family']} variant" if model.variant else "")
        + f") on http://{host!s}:{port} (loaded in {model.load_ms:.0f} ms, {model.threads} threads"
        + (f", {len(keys)} API keys" if keys else "")
        + ")",
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The inference server of a packaged model: this file alone, with numpy, onnxruntime and tokenizers.

    python server.py --model BUNDLE [--host 0.0.0.0] [--port 8080] [--threads N]

BUNDLE is what `edge-compress package` writes: model.onnx, tokenizer/ and metadata.json. The same file
runs in the runtime images (no edge-compress, no PyTorch) and natively (`edge-compress serve`). Before
loading, metadata.json's fields are checked and every file it lists must have its packaged sha256; a
bundle that fails is one "error: ..." line on stderr and exit code 2.

    POST /v1/predict   {"texts": ["...", ...], "truncate": false}  (or {"text": "..."})
                       -> {"embeddings": [[...]]} or {"labels": [...], "scores": [[...]]}, and "tokens"
                       a pair classifier: {"pairs": [["first", "second"], ...]} -> labels and scores per pair
                       a tagger: {"words": [["The", "cat", ...], ...]} (or "texts", split on whitespace)
                       -> {"tags": [[...]], "scores": [[[...]]], "words_cut": [...]}: one per word, null if cut
    GET  /healthz      -> {"status": "ok"}: the model is loaded and answers
    GET  /metadata     -> model hash, recipe, validation metrics, runtime versions

Bad requests get a 4xx with a one-line JSON {"error": ...} and the server keeps serving. One inference
runs at a time, with every core: on a small device, two requests sharing the cores are each slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
        BadRequest,
        ByteEncoder,
        Request,
        TokenizerEncoder,
        encode,
        parse_request,
        tag_words,
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
        BadRequest,
        ByteEncoder,
        Request,
        TokenizerEncoder,
        encode,
        parse_request,
        tag_words,
    )

__all__ = ["FORMAT", "BundleError", "Model", "main", "sha256_of"]
LIBRARY_ENV = "EDGE_COMPRESS_OPS_LIBRARY"  # the native kernels of our attention ops, for models that use them
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
            feeds, _ = self.encode([WARM_UP[self.input_kind]], truncate=True)
            with self.lock:
                out = self.session.run(None, feeds)[0]
        except Exception as exc:
            raise BundleError(f"the model fails on a first request: {type(exc).__name__}: {first_line(exc)}") from None
        if self.labels and self.task != "embedding" and out.shape[-1] != len(self.labels):
            raise BundleError(
                f"metadata.json names {len(self.labels)} labels but the model scores {out.shape[-1]}; "
                "re-package the run"
            )

    def encode(self, examples: list[Any], truncate: bool) -> tuple[dict[str, Any], list[int]]:
        """The model's input arrays for these examples (texts, pairs or tuples of words) and their token counts."""
        request = Request(list(examples), truncate, FIELD[self.input_kind])
        encoded = encode(self.encoder, request, self.input_kind, self.inputs, self.max_length)
        return encoded.feeds, encoded.tokens

    def predict(self, examples: list[Any], truncate: bool = False) -> dict[str, Any]:
        """The task's answer for examples of the model's input kind (texts, (first, second) pairs, word tuples)."""
        return self.answer(Request(list(examples), truncate, FIELD[self.input_kind]))

    def answer(self, request: Request) -> dict[str, Any]:
        np = self.np
        encoded = encode(self.encoder, request, self.input_kind, self.inputs, self.max_length)
        with self.lock:
            out = self.session.run(None, encoded.feeds)[0]
        result: dict[str, Any] = {"tokens": encoded.tokens}
        if self.task == "embedding":
            result["embeddings"] = out.astype(float).tolist()
            return result
        shifted = out - out.max(axis=-1, keepdims=True)
        scores = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)  # (B, L), a tagger's (B, S, L)
        if encoded.starts is not None:
            result.update(tag_words(scores, encoded.starts, self.labels))
            if request.split:  # the words the tags belong to, as the texts were split
                result["words"] = [list(words) for words in request.examples]
            return result
        picks = scores.argmax(axis=-1).tolist()
        result["labels"] = [self.labels[p] if self.labels else p for p in picks]
        result["scores"] = scores.astype(float).tolist()
        return result


def library_isa(path: str) -> str | None:
    import ctypes

    try:
        lib = ctypes.CDLL(path)
        lib.EdgeCompressOpsIsa.restype = ctypes.c_char_p
        return str(lib.EdgeCompressOpsIsa().decode())
    except (OSError, AttributeError):
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request reuses the connection
    disable_nagle_algorithm = True  # TCP_NODELAY: Nagle + delayed ACK would add 40 ms to small answers
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: HTTPStatus, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self._consumed = False  # the next request on this connection has its own body

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        """A 4xx/5xx with a one-line JSON error. A body left unread would be parsed as the next request:
        such a connection is closed after the answer."""
        self.server.errors += 1
        try:
            pending = not self._consumed and int(self.headers.get("Content-Length") or 0) > 0
        except ValueError:
            pending = True
        self._send(status, {"error": message}, close=close or pending or bool(self.headers.get("Transfer-Encoding")))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:  # noqa: ARG002
        """http.server's own errors (bad request line, unknown method, header too long) as JSON too."""
        self.server.errors += 1
        self._send(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase}, close=True)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, {"status": "ok", "requests": self.server.served, "errors": self.server.errors})
        elif self.path == "/metadata":
            self._send(HTTPStatus.OK, self.server.metadata())
        elif self.path == "/v1/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST for /v1/predict")
        else:
            self._error(
                HTTPStatus.NOT_FOUND, f"no route {self.path}; try POST /v1/predict, GET /healthz, GET /metadata"
            )

    def do_POST(self) -> None:
        if self.path != "/v1/predict":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try POST /v1/predict")
            return
        try:
            result = self.server.model.answer(self._read_request())
        except BadRequest as exc:
            # The body was read whole unless it was too big or of unknown length: then close after answering.
            self._error(exc.status, str(exc))
            return
        except Exception as exc:
            sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"inference failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            )
            return
        self.server.served += 1
        self._send(HTTPStatus.OK, result)

    def do_PUT(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET /healthz, GET /metadata and POST /v1/predict")

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _read_request(self) -> Request:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (no chunked transfer)")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {length_header!r} is not a number") from None
        if length < 0:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {length} is negative")
        if length > limits["max_body_bytes"]:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body is {length} bytes; the limit is {limits['max_body_bytes']} (--max-body-bytes)",
            )
        body = self.rfile.read(length)
        self._consumed = True
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadRequest(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be application/json, not {content_type or 'none'!r}",
            )
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}") from None
        return parse_request(request, self.server.model.input_kind, limits["max_texts"])

    _consumed = False


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: Model, limits: dict[str, int], access_log: bool) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.limits = limits
        self.access_log = access_log
        self.served = 0
        self.errors = 0
        self.started = time.time()

    def metadata(self) -> dict[str, Any]:
        meta = dict(self.model.meta)
        meta["runtime"] = self.model.runtime
        if self.model.variant is not None:  # which CPU family's int8 model answers, and why that one
            meta["variant"] = {k: self.model.variant[k] for k in ("family", "file", "sha256", "chosen_by")}
        meta["limits"] = self.limits
        meta["uptime_s"] = round(time.time() - self.started, 1)
        return meta


def healthcheck(port: int) -> int:
    """The image's HEALTHCHECK: 0 when the server on this port answers /healthz with 200."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as answer:
            return 0 if answer.status == HTTPStatus.OK else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a packaged edge-compress model over HTTP.")
    parser.add_argument("--model", default=os.environ.get("EDGE_COMPRESS_MODEL", "/model"), help="the bundle folder")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime intra-op threads"
    )
    parser.add_argument(
        "--ops-library", default=None, help=f"native kernels of our attention ops (default ${LIBRARY_ENV})"
    )
    parser.add_argument(
        "--cpu-family",
        choices=sorted(VARIANT_FILES),
        default=os.environ.get(FAMILY_ENV) or None,
        help=f"a bundle of variants: serve this family's (default: this CPU's, from its flags; ${FAMILY_ENV})",
    )
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-texts", type=int, default=64)
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--healthcheck", action="store_true", help="ask a running server's /healthz (exit 0 or 1)")
    args = parser.parse_args(argv)
    if args.healthcheck:
        return healthcheck(args.port)
    try:
        model = Model(Path(args.model), max(1, args.threads), args.ops_library, args.cpu_family)
        model.warm_up()
    except (BundleError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    limits = {"max_body_bytes": args.max_body_bytes, "max_texts": args.max_texts}
    try:
        server = Server((args.host, args.port), model, limits, args.access_log)
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
        return 2

    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)  # as PID 1 in a container, SIGTERM is ignored unless handled
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(
        f"serving {model.meta.get('name', 'model')} ({model.task}, sha256 {model.sha256[:12]}"
        + (f", {model.variant['family']} variant" if model.variant else "")
        + ") "
        f"on http://{host!s}:{port} (loaded in {model.load_ms:.0f} ms, {model.threads} threads)",
        flush=True,
    )
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

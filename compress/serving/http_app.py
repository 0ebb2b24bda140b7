"""The server's HTTP side: an ASGI application (run by uvicorn), its limits, access and metrics.

Standalone (uvicorn, h11 and prometheus_client; numpy and onnxruntime through the model): the runtime images
copy it beside server.py. What each route answers is in protocols.py; this file holds what every request
goes through:

- routing (path, then method: 404 or 405 with one line), the query string ignored;
- API keys: with keys set, every route but /healthz and /v2/health/* wants `Authorization: Bearer KEY` (401);
- the body: read within --max-body-bytes (413) and --request-timeout (408), JSON parsed without a traceback
  for a nesting bomb, a 5,000-digit number or bytes that are no UTF-8 (400);
- at most --max-concurrent model requests at once, beyond that 429 with Retry-After;
- one JSON line per request on stderr (the access log) and the Prometheus metrics of GET /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

if __package__:
    from compress.serving.batcher import Batcher, BatchSettings, Saturated
    from compress.serving.model_inputs import BadRequest
else:  # beside server.py in the runtime images
    from batcher import Batcher, BatchSettings, Saturated  # type: ignore[import-not-found,no-redef]
    from model_inputs import BadRequest  # type: ignore[import-not-found,no-redef]

OPEN_PATHS = ("/healthz", "/v2/health/live", "/v2/health/ready")  # answered without an API key
INLINE_CHARS = 8192  # a request of fewer characters is tokenized on the event loop's thread
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_concurrent: int = 64  # model requests in flight (queued or running); beyond: 429
    request_timeout_s: float = 30.0  # to receive a body once the headers are in; beyond: 408
    api_keys: tuple[str, ...] = ()
    access_log: bool = True
    rerank_label: str | None = None
    max_header_bytes: int = 16384  # h11 enforces it only on headers that arrive in pieces: checked again here

    def public(self) -> dict[str, Any]:
        """What /metadata shows (never the keys)."""
        shown = {k: v for k, v in self.__dict__.items() if k != "api_keys"}
        return {**shown, "api_keys": len(self.api_keys)}


@dataclass
class Call:
    """One request as a route sees it."""

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    consumed: bool = False  # the body was read whole: the connection can serve the next request
    examples: int = 0  # for the access log: how many texts it asked about

    def json(self) -> Any:
        content_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadRequest(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be application/json, not {content_type or 'none'!r}",
            )
        try:
            return json.loads(self.body)
        except RecursionError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed JSON: nested too deeply") from None
        except UnicodeDecodeError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed JSON: the body is not UTF-8") from None
        except ValueError as exc:  # JSONDecodeError, and an integer of more than 4,300 digits
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"malformed JSON: {str(exc).splitlines()[0]}") from None


@dataclass
class Reply:
    status: int
    payload: Any
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes | None = None  # a body that is not JSON (the metrics)


Handler = Callable[["App", Call], Awaitable[Reply]]
ErrorShape = Callable[[int, str], Any]


def plain_error(status: int, message: str) -> Any:  # noqa: ARG001
    return {"error": message}


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str  # the metrics label: the pattern as written
    model: bool = False  # runs the model: counted against --max-concurrent
    error: ErrorShape = plain_error


def route(method: str, path: str, handler: Handler, model: bool = False, error: ErrorShape = plain_error) -> Route:
    pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
    return Route(method, pattern, handler, path, model, error)


class Metrics:
    """The Prometheus series of GET /metrics, in a registry of this server's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edge_compress_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "edge_compress_request_duration_seconds", "Time to answer", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "edge_compress_batch_size", "Examples per ONNX Runtime run", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.batch_tokens = Histogram(
            "edge_compress_batch_tokens",
            "Padded tokens per ONNX Runtime run",
            buckets=(64, 256, 1024, 4096, 16384),
            registry=r,
        )
        self.queue = Gauge("edge_compress_queue_depth", "Examples waiting for a run", registry=r)
        self.inflight = Gauge("edge_compress_requests_in_flight", "Model requests being answered", registry=r)
        self.load = Gauge("edge_compress_model_load_seconds", "Time ONNX Runtime took to load the model", registry=r)

    def observe_batch(self, rows: int, tokens: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class App:
    """The ASGI application: `await app(scope, receive, send)`, as uvicorn calls it."""

    def __init__(self, model: Any, limits: Limits, batching: BatchSettings, routes: list[Route]) -> None:
        self.model = model
        self.limits = limits
        self.routes = routes
        self.batcher = Batcher(model.run_batch, batching)
        self.metrics = Metrics()
        self.metrics.load.set(model.load_ms / 1000.0)
        self.batcher.stats.observe = self.metrics.observe_batch
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.inflight = 0
        self.served = 0
        self.errors = 0
        self.started = time.time()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.batcher.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.batcher.stop()  # what was accepted is answered first
                self.tokenizing.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def infer(self, request: Any) -> tuple[list[Any], list[Any]]:
        """(rows, outputs) of a checked request: tokenized on a thread of its own, run by the batcher."""
        size = sum(len(x) if isinstance(x, str) else sum(map(len, x)) for x in request.examples)
        if size <= INLINE_CHARS:  # a thread hop costs more than tokenizing a short request (0.45 ms measured)
            rows = self.model.tokenize(request)
        else:  # a long one is tokenized beside the loop, which keeps serving
            rows = await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.model.tokenize, request)
        self.metrics.queue.set(self.batcher.stats.queued_rows + len(rows))
        try:
            outputs = await self.batcher.submit(rows, [len(r[0]) for r in rows])
        except Saturated as exc:
            raise BadRequest(HTTPStatus.TOO_MANY_REQUESTS, f"the server is saturated: {exc}; retry later") from None
        finally:
            self.metrics.queue.set(self.batcher.stats.queued_rows)
        return rows, outputs

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        allowed: list[str] = []
        for r in self.routes:
            found = r.pattern.match(path)
            if found:
                if r.method == method:
                    return r, found.groupdict(), []
                allowed.append(r.method)
        return None, {}, allowed

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        call = Call(scope["method"], scope["path"], {}, headers)
        found, call.params, allowed = self._match(call.method, call.path)
        error = found.error if found else plain_error
        counted = False
        try:
            self._check_headers(scope)
            if found is None:
                reply = self._unrouted(call, allowed)
            else:
                self._authorize(call)
                counted = self._admit(found)
                if call.method == "POST":
                    call.body = await self._body(call, receive)
                reply = await found.handler(self, call)
        except BadRequest as exc:
            reply = self._refusal(call, exc, error)
        except Exception as exc:  # a failed run: 500 with one line, the server keeps serving
            sys.stderr.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}) + "\n")
            reply = Reply(500, error(500, f"inference failed: {type(exc).__name__}: {_first(exc)}"))
        finally:
            if counted:
                self.inflight -= 1
                self.metrics.inflight.set(self.inflight)
        sent = await _send(send, reply)
        self._account(call, found.name if found else "unmatched", reply.status, start, sent)

    def _check_headers(self, scope: dict[str, Any]) -> None:
        size = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        limit = self.limits.max_header_bytes
        if size > limit:
            raise BadRequest(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request headers are {size} bytes; the limit is {limit} (--max-header-bytes)",
            )

    def _admit(self, found: Route) -> bool:
        """Count a model request in flight (True), or refuse it with 429 beyond --max-concurrent."""
        if not found.model:
            return False
        if self.inflight >= self.limits.max_concurrent:
            raise BadRequest(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"{self.inflight} requests in flight; the limit is {self.limits.max_concurrent} "
                "(--max-concurrent): retry later",
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        return True

    def _unrouted(self, call: Call, allowed: list[str]) -> Reply:
        if allowed:
            message = f"use {' or '.join(sorted(set(allowed)))} for {call.path}"
            return Reply(405, {"error": message}, [(b"allow", ", ".join(sorted(set(allowed))).encode())])
        paths = "POST /v1/predict, POST /v1/embeddings, POST /embed, POST /predict, POST /rerank, /v2/..."
        return Reply(404, {"error": f"no route {call.method} {call.path}; this server answers {paths}"})

    def _authorize(self, call: Call) -> None:
        if not self.limits.api_keys or call.path in OPEN_PATHS:
            return
        given = call.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() == "bearer" and any(
            hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.limits.api_keys
        ):
            return
        raise BadRequest(HTTPStatus.UNAUTHORIZED, "a valid API key is required: send Authorization: Bearer KEY")

    def _refusal(self, call: Call, exc: BadRequest, error: ErrorShape) -> Reply:
        headers: list[tuple[bytes, bytes]] = []
        if exc.status == HTTPStatus.TOO_MANY_REQUESTS:
            headers.append((b"retry-after", b"1"))
        if exc.status == HTTPStatus.UNAUTHORIZED:
            headers.append((b"www-authenticate", b'Bearer realm="edge-compress"'))
        if call.method == "POST" and not call.consumed:
            headers.append((b"connection", b"close"))  # a body left unread: this connection is done
        return Reply(int(exc.status), error(int(exc.status), str(exc)), headers)

    async def _body(self, call: Call, receive: Any) -> bytes:
        limit = self.limits.max_body_bytes
        declared = call.headers.get("content-length")
        if declared is None and "transfer-encoding" not in call.headers:  # HTTP/1.1: then the body is empty
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (or chunked)")
        if declared is not None and int(declared) > limit:  # h11 let only digits through
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body is {declared} bytes; the limit is {limit} (--max-body-bytes)",
            )
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise BadRequest(HTTPStatus.BAD_REQUEST, "the client went away")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise BadRequest(
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"body is over the limit of {limit} bytes (--max-body-bytes)",
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        call.consumed = True
                        return b"".join(chunks)
        except TimeoutError:
            raise BadRequest(
                HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.limits.request_timeout_s:g} s"
            ) from None

    def _account(self, call: Call, name: str, status: int, start: float, sent: int) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(name, str(status)).inc()
        self.metrics.latency.labels(name).observe(elapsed)
        if status >= 400:
            self.errors += 1
        elif call.method == "POST":
            self.served += 1
        if self.limits.access_log:
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                "method": call.method,
                "path": call.path[:200],
                "status": status,
                "ms": round(elapsed * 1000.0, 2),
                "bytes_in": len(call.body),
                "bytes_out": sent,
                "examples": call.examples,
            }
            sys.stderr.write(json.dumps(entry) + "\n")


def _first(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


async def _send(send: Any, reply: Reply) -> int:
    if reply.raw is not None:
        data = reply.raw
        kind = b"text/plain; version=0.0.4; charset=utf-8"
    else:
        data = json.dumps(reply.payload, separators=(",", ":"), ensure_ascii=False).encode()
        kind = b"application/json"
    headers = [(b"content-type", kind), (b"content-length", str(len(data)).encode()), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
    return len(data)

"""What each route of the server answers: our own /v1/predict, OpenAI's /v1/embeddings, Hugging Face
text-embeddings-inference's /embed, /predict and /rerank, and the Open Inference Protocol v2 (KServe, Triton).

Standalone (numpy through the model): the runtime images copy it beside server.py. A route the model's task
does not fit answers 404 with one line that says which route does; a request it cannot take, 4xx with one
line (OpenAI's routes in OpenAI's error shape, so that its client raises with the message).
"""

from __future__ import annotations

import base64
import time
from http import HTTPStatus
from typing import Any

if __package__:
    from compress.serving.http_app import App, Call, Reply, Route, route
    from compress.serving.model_inputs import BadRequest, Request, check_count, check_text, parse_request
else:  # beside server.py in the runtime images
    from http_app import App, Call, Reply, Route, route  # type: ignore[import-not-found,no-redef]
    from model_inputs import BadRequest, Request, check_count, check_text, parse_request  # type: ignore[import-not-found,no-redef]

VERSION = "1"  # the one version of the model an OIP client sees


def _unprocessable(message: str) -> BadRequest:
    return BadRequest(HTTPStatus.UNPROCESSABLE_ENTITY, message)


def _object(body: Any, known: tuple[str, ...], required: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _unprocessable(f'the body must be a JSON object with "{required}"')
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise _unprocessable(f"unknown field {unknown[0]!r}; this route takes {', '.join(known)}")
    if required not in body:
        raise _unprocessable(f'"{required}" is required')
    return body


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _unprocessable(f'"{name}" must be true or false')
    return value


def _texts(value: Any, field: str, limit: int) -> list[str]:
    """A string or a non-empty list of strings, within the --max-texts limit."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _unprocessable(f'"{field}" must be a string or a non-empty list of strings')
    check_count(len(items), "texts", limit)
    if any(isinstance(x, int) or (isinstance(x, list) and x and isinstance(x[0], int)) for x in items):
        raise _unprocessable(f'"{field}" holds token ids: this server takes text')
    return [check_text(x, f"{field}[{i}]") for i, x in enumerate(items)]


def _needs(app: App, task: str, kind: str, route_name: str, instead: str) -> None:
    model = app.model
    if model.task != task or model.input_kind != kind:
        what = {"embedding": "an embedding model", "classification": "a classifier"}.get(model.task, model.task)
        raise BadRequest(
            HTTPStatus.NOT_FOUND,
            f"{route_name} needs {instead}; this model is {what} of {model.input_kind}: use POST /v1/predict",
        )


async def _run(app: App, call: Call, examples: list[Any], truncate: bool, field: str) -> tuple[Any, list[int]]:
    """The model's raw outputs (N, ...) for these examples, and their token counts."""
    call.examples = len(examples)
    rows, outputs = await app.infer(Request(examples, truncate, field))
    return app.model.np.stack(outputs), [len(r[0]) for r in rows]


# ---- our own: POST /v1/predict ------------------------------------------------------------------------------


async def predict_v1(app: App, call: Call) -> Reply:
    request = parse_request(call.json(), app.model.input_kind, app.limits.max_texts)
    call.examples = len(request.examples)
    rows, outputs = await app.infer(request)
    return Reply(200, app.model.result(request, rows, outputs))


# ---- OpenAI: POST /v1/embeddings, GET /v1/models ------------------------------------------------------------


def openai_error(status: int, message: str) -> Any:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status)
    return {"error": {"message": message, "type": kind or "invalid_request_error", "param": None, "code": status}}


async def openai_embeddings(app: App, call: Call) -> Reply:
    _needs(app, "embedding", "text", "/v1/embeddings", "an embedding model")
    known = ("input", "model", "encoding_format", "dimensions", "user", "truncate")
    body = _object(call.json(), known, "input")
    texts = _texts(body["input"], "input", app.limits.max_texts)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _unprocessable(f'"encoding_format" must be "float" or "base64", not {fmt!r}')
    vectors, tokens = await _run(app, call, texts, _flag(body, "truncate", False), "input")
    if "dimensions" in body and body["dimensions"] != vectors.shape[1]:
        raise _unprocessable(
            f'"dimensions": this model gives {vectors.shape[1]} and cannot give {body["dimensions"]!r}'
        )
    np = app.model.np
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            if fmt == "base64"
            else v.astype(float).tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
    return Reply(200, {"object": "list", "data": data, "model": app.model.name, "usage": usage})


async def openai_models(app: App, call: Call) -> Reply:  # noqa: ARG001
    entry = {"id": app.model.name, "object": "model", "created": int(app.started), "owned_by": "edge-compress"}
    return Reply(200, {"object": "list", "data": [entry]})


# ---- text-embeddings-inference: POST /embed, /predict, /rerank ------------------------------------------------


async def tei_embed(app: App, call: Call) -> Reply:
    _needs(app, "embedding", "text", "/embed", "an embedding model")
    body = _object(call.json(), ("inputs", "truncate", "normalize"), "inputs")
    texts = _texts(body["inputs"], "inputs", app.limits.max_texts)
    vectors, _ = await _run(app, call, texts, _flag(body, "truncate", False), "inputs")
    if _flag(body, "normalize", True):
        norms = app.model.np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / app.model.np.maximum(norms, 1e-12)
    return Reply(200, vectors.astype(float).tolist())


def _classify_inputs(value: Any, kind: str, limit: int) -> tuple[list[Any], bool]:
    """TEI's /predict inputs for a text classifier (a text, or a list of texts or of [text]) or a pair
    classifier ([first, second], or a list of those): the examples and whether one was sent alone."""
    if kind == "text":
        if isinstance(value, list):
            value = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in value]
        return _texts(value, "inputs", limit), isinstance(value, str)
    single = isinstance(value, list) and len(value) == 2 and all(isinstance(x, str) for x in value)
    items = [value] if single else value
    if not isinstance(items, list) or not items or not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise _unprocessable('"inputs" must be a pair ["first", "second"] or a list of pairs')
    check_count(len(items), "pairs", limit)
    pairs = [(check_text(a, f"inputs[{i}][0]"), check_text(b, f"inputs[{i}][1]")) for i, (a, b) in enumerate(items)]
    return pairs, single


async def tei_predict(app: App, call: Call) -> Reply:
    model = app.model
    if model.task != "classification" or model.input_kind == "words":
        raise BadRequest(HTTPStatus.NOT_FOUND, "/predict needs a text or pair classifier; use POST /v1/predict")
    body = _object(call.json(), ("inputs", "truncate", "raw_scores"), "inputs")
    examples, single = _classify_inputs(body["inputs"], model.input_kind, app.limits.max_texts)
    logits, _ = await _run(app, call, examples, _flag(body, "truncate", False), "inputs")
    scores = logits if _flag(body, "raw_scores", False) else model.probabilities(logits)
    names = model.labels or [str(i) for i in range(scores.shape[1])]
    answers = [
        sorted(({"score": float(s), "label": n} for s, n in zip(row, names, strict=True)), key=lambda x: -x["score"])
        for row in scores
    ]
    return Reply(200, answers[0] if single else answers)


async def tei_rerank(app: App, call: Call) -> Reply:
    model = app.model
    if model.task != "classification" or model.input_kind != "pair":
        raise BadRequest(HTTPStatus.NOT_FOUND, "/rerank needs a pair classifier (a cross-encoder); use /v1/predict")
    body = _object(call.json(), ("query", "texts", "truncate", "raw_scores", "return_text"), "query")
    query = check_text(body["query"], "query")
    texts = _texts(body.get("texts"), "texts", app.limits.max_texts)
    column = rerank_column(model.labels, app.limits.rerank_label)
    logits, _ = await _run(app, call, [(query, t) for t in texts], _flag(body, "truncate", False), "texts")
    if logits.shape[1] == 1:
        scores = logits[:, 0] if _flag(body, "raw_scores", False) else 1.0 / (1.0 + model.np.exp(-logits[:, 0]))
    else:
        scores = (logits if _flag(body, "raw_scores", False) else model.probabilities(logits))[:, column]
    ranked = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
    with_text = _flag(body, "return_text", False)
    return Reply(
        200, [{"index": i, "score": float(scores[i]), **({"text": texts[i]} if with_text else {})} for i in ranked]
    )


def rerank_column(labels: list[str] | None, wanted: str | None) -> int:
    """Which label's probability ranks the texts: the only one, or the one --rerank-label names."""
    if not labels or len(labels) == 1:
        return 0
    if wanted is None:
        raise _unprocessable(f"this pair classifier has labels {labels}: start the server with --rerank-label LABEL")
    return labels.index(wanted)


# ---- Open Inference Protocol v2 -------------------------------------------------------------------------------


def _model_named(app: App, call: Call) -> None:
    name = call.params.get("name")
    if name != app.model.name:
        raise BadRequest(HTTPStatus.NOT_FOUND, f"no model {name!r}; this server has {app.model.name!r}")
    version = call.params.get("version")
    if version is not None and version != VERSION:
        raise BadRequest(HTTPStatus.NOT_FOUND, f"no version {version!r} of {name!r}; it has {VERSION!r}")


def oip_io(app: App) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's tensors as an OIP client sees them: BYTES texts in, FP32 (and BYTES labels) out."""
    model = app.model
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    if model.input_kind == "pair":
        inputs.append({"name": "text_pair", "datatype": "BYTES", "shape": [-1]})
    if model.task == "embedding":
        return inputs, [{"name": "embedding", "datatype": "FP32", "shape": [-1, model.dimensions]}]
    width = len(model.labels or []) or -1
    return inputs, [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, width]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]


async def oip_server(app: App, call: Call) -> Reply:  # noqa: ARG001
    return Reply(200, {"name": "edge-compress", "version": app.model.runtime.get("server", "1"), "extensions": []})


async def oip_live(app: App, call: Call) -> Reply:  # noqa: ARG001
    return Reply(200, {"live": True})


async def oip_ready(app: App, call: Call) -> Reply:  # noqa: ARG001
    return Reply(200, {"ready": True})


async def oip_model_ready(app: App, call: Call) -> Reply:
    _model_named(app, call)
    return Reply(200, {"name": app.model.name, "ready": True})


async def oip_model(app: App, call: Call) -> Reply:
    _model_named(app, call)
    inputs, outputs = oip_io(app)
    meta = {"name": app.model.name, "versions": [VERSION], "platform": "onnxruntime_onnx"}
    return Reply(200, {**meta, "inputs": inputs, "outputs": outputs})


def _oip_tensor(tensor: Any, i: int) -> tuple[str, list[str]]:
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= set(tensor):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"inputs[{i}] needs name, shape, datatype and data")
    name, shape, data = tensor["name"], tensor["shape"], tensor["data"]
    if tensor["datatype"] != "BYTES":
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"input {name!r} is {tensor['datatype']!r}: texts are BYTES")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"input {name!r}: shape must be a list of sizes, e.g. [2]")
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"input {name!r}: shape {shape}: one text per row ([N] or [N, 1])")
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])] if isinstance(data, list) else None
    if flat is None or len(flat) != shape[0]:
        got = "not a list" if flat is None else f"{len(flat)} elements"
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"input {name!r}: shape {shape} but data has {got}")
    return str(name), [check_text(x, f"{name}[{k}]") for k, x in enumerate(flat)]


async def oip_infer(app: App, call: Call) -> Reply:
    _model_named(app, call)
    model = app.model
    if model.input_kind == "words":
        raise BadRequest(HTTPStatus.NOT_FOUND, "this model tags words (ragged outputs): use POST /v1/predict")
    body = call.json()
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadRequest(HTTPStatus.BAD_REQUEST, 'the body must be an object with "inputs": [tensor, ...]')
    tensors = dict(_oip_tensor(t, i) for i, t in enumerate(body["inputs"]))
    wanted = [t["name"] for t in oip_io(app)[0]]
    if sorted(tensors) != sorted(wanted):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"inputs are {sorted(tensors)}; this model takes {wanted}")
    texts = tensors["text"]
    check_count(len(texts), "texts", app.limits.max_texts)
    if model.input_kind == "pair" and len(tensors["text_pair"]) != len(texts):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "text and text_pair must have the same shape")
    examples: list[Any] = list(zip(texts, tensors["text_pair"], strict=True)) if "text_pair" in tensors else texts
    params = body.get("parameters") or {}
    truncate = params.get("truncate", False) if isinstance(params, dict) else False
    if not isinstance(truncate, bool):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "parameters.truncate must be true or false")
    values, _ = await _run(app, call, examples, truncate, "text")
    outputs = _oip_outputs(app, values)
    asked = [str(o.get("name")) for o in body.get("outputs") or [] if isinstance(o, dict)]
    unknown = sorted(set(asked) - {o["name"] for o in outputs})
    if unknown:
        raise BadRequest(
            HTTPStatus.BAD_REQUEST, f"no output {unknown[0]!r}; this model gives {[o['name'] for o in outputs]}"
        )
    answer = {
        "model_name": model.name,
        "model_version": VERSION,
        "outputs": [o for o in outputs if not asked or o["name"] in asked],
    }
    if "id" in body:
        answer["id"] = body["id"]
    return Reply(200, answer)


def _oip_outputs(app: App, values: Any) -> list[dict[str, Any]]:
    model = app.model
    if model.task == "embedding":
        flat = values.astype(float).ravel().tolist()
        return [{"name": "embedding", "datatype": "FP32", "shape": list(values.shape), "data": flat}]
    probs = model.probabilities(values)
    names = model.labels or [str(i) for i in range(probs.shape[1])]
    labels = [names[int(k)] for k in probs.argmax(axis=1)]
    return [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": list(probs.shape),
            "data": probs.astype(float).ravel().tolist(),
        },
        {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
    ]


# ---- the server's own: GET /healthz, /metadata, /metrics ------------------------------------------------------


async def healthz(app: App, call: Call) -> Reply:  # noqa: ARG001
    return Reply(200, {"status": "ok", "requests": app.served, "errors": app.errors})


async def metadata(app: App, call: Call) -> Reply:  # noqa: ARG001
    meta = app.model.metadata()
    meta["limits"] = app.limits.public()
    meta["batching"] = dict(app.batcher.settings.__dict__)
    meta["uptime_s"] = round(time.time() - app.started, 1)
    return Reply(200, meta)


async def metrics(app: App, call: Call) -> Reply:  # noqa: ARG001
    return Reply(200, None, raw=app.metrics.text())


def routes() -> list[Route]:
    """Every route, in the order they are matched."""
    infer_paths = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
    return [
        route("GET", "/healthz", healthz),
        route("GET", "/metadata", metadata),
        route("GET", "/metrics", metrics),
        route("POST", "/v1/predict", predict_v1, model=True),
        route("POST", "/v1/embeddings", openai_embeddings, model=True, error=openai_error),
        route("GET", "/v1/models", openai_models, error=openai_error),
        route("POST", "/embed", tei_embed, model=True),
        route("POST", "/predict", tei_predict, model=True),
        route("POST", "/rerank", tei_rerank, model=True),
        route("GET", "/v2", oip_server),
        route("GET", "/v2/health/live", oip_live),
        route("GET", "/v2/health/ready", oip_ready),
        route("GET", "/v2/models/{name}", oip_model),
        route("GET", "/v2/models/{name}/versions/{version}", oip_model),
        route("GET", "/v2/models/{name}/ready", oip_model_ready),
        route("GET", "/v2/models/{name}/versions/{version}/ready", oip_model_ready),
        *(route("POST", path, oip_infer, model=True) for path in infer_paths),
    ]

"""Serving the Hugging Face task models: a classifier of text pairs and a tagger of words.

Tiny random-init BERTs with a sequence head and a token head go through export -> quantize -> validate;
`package` records their input kind and labels, and the server (server.py run as a script, as in the
runtime images) must answer exactly what the pipeline's ONNX Runtime session answers on the pipeline's
own encoding (compress.runtime.feeds), truncation included, and refuse malformed requests in one line.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from compress.artifact import Artifact
from compress.context import Context
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime.feeds import encoder, word_starts
from compress.serving import model_inputs, server
from compress.serving.bundle import write_bundle
from compress.serving.bundle_check import BundleError, load_metadata
from exporters import native
from tests.conftest import TEXTS
from tests.hf_archs import ARCHS, build
from tests.test_serving import Client, free_port, start_server

NLI = ("entailment", "neutral", "contradiction")
TAGS = ("ADP", "DET", "NOUN", "VERB")
MAX_LENGTH = 32
LONG = " ".join(TEXTS[:4])  # about 40 tokens: over MAX_LENGTH alone


def _tiny_head(folder: Path, head: str, labels: tuple[str, ...]) -> Path:
    """A 2-layer BERT with a random sequence or token head; the vocabulary splits some words into sub-tokens."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertTokenizerFast

    words = sorted({w for t in TEXTS for w in re.findall(r"[a-z]+", t)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "##s", "##ed", "##ing", *words]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(
        folder
    )  # transformers 5: vocab=, not vocab_file=
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,  # outputs that differ from token to token: a misread position shows
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = (BertForSequenceClassification if head == "sequence" else BertForTokenClassification)(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _tag(word: str) -> str:
    return "DET" if word in {"the", "a"} else "ADP" if word in {"on", "at", "of", "after"} else "NOUN"


def _recipe(tmp: Path, name: str, task: str, model: Path, evaluation: dict[str, Any]) -> Path:
    recipe = {
        "name": name,
        "model": {"hf": str(model)},
        "task": task,
        "data": {"evaluation": evaluation, "max_length": MAX_LENGTH, "batch_size": 4},
        "stages": [
            {"type": "export"},
            {"type": "quantize", "mode": "dynamic"},
            {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": MAX_LENGTH},
        ],
        "output": {"dir": str(tmp / "runs")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _packaged(tmp: Path, path: Path) -> tuple[Path, Path]:
    recipe = load_recipe(path)
    run_dir = run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))
    bundle = tmp / f"{recipe.name}-bundle"
    assert write_bundle(run_dir, bundle)["validated"]["passed"]
    return run_dir, bundle


@pytest.fixture(scope="module")
def pair_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pairs")
    model = _tiny_head(tmp / "nli-bert", "sequence", NLI)
    rows = [{"premise": TEXTS[i], "hypothesis": TEXTS[(i * 5 + 1) % 12], "label": NLI[i % 3]} for i in range(12)]
    (tmp / "nli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation = {"path": str(tmp / "nli.jsonl"), "text_field": "premise", "text_pair_field": "hypothesis"}
    return _packaged(tmp, _recipe(tmp, "nli", "classification", model, {**evaluation, "label_field": "label"}))


@pytest.fixture(scope="module")
def tag_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tags")
    model = _tiny_head(tmp / "pos-bert", "token", TAGS)
    rows = [{"tokens": t.split(), "tags": [_tag(w) for w in t.split()]} for t in TEXTS]
    (tmp / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation = {"path": str(tmp / "pos.jsonl"), "words_field": "tokens", "tags_field": "tags"}
    return _packaged(tmp, _recipe(tmp, "pos", "token-classification", model, evaluation))


def _served(bundle: Path) -> Iterator[int]:
    port = free_port()
    proc = start_server(bundle, port, "--max-texts", "8", "--threads", "1")  # server.py as a script
    yield port
    proc.terminate()
    assert proc.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def pair_port(pair_bundle: tuple[Path, Path]) -> Iterator[int]:
    yield from _served(pair_bundle[1])


@pytest.fixture(scope="module")
def tag_port(tag_bundle: tuple[Path, Path]) -> Iterator[int]:
    yield from _served(tag_bundle[1])


def _session(run_dir: Path) -> tuple[Artifact, Any]:
    """The validated model as the pipeline holds it, and a plain ONNX Runtime session of it."""
    import onnxruntime as ort

    validated = sorted(run_dir.glob("0*_validate"))[0]
    artifact = Artifact.from_json((validated / "artifact.json").read_text(), run_dir)
    return artifact, ort.InferenceSession(str(artifact.file("model")), providers=["CPUExecutionProvider"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return np.asarray(e / e.sum(-1, keepdims=True))


def test_pair_bundle_records_its_kind_and_the_server_answers_as_the_pipeline(
    pair_bundle: tuple[Path, Path], pair_port: int
) -> None:
    run_dir, bundle = pair_bundle
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["input_kind"] == "pair" and meta["labels"] == list(NLI) and meta["version"] == 3
    assert meta["task"] == "classification" and "token_type_ids" in meta["inputs"]
    artifact, session = _session(run_dir)
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], "the bank"), (LONG, TEXTS[5]), (TEXTS[6], LONG + " " + TEXTS[7])]
    feeds = encoder(artifact)(pairs, MAX_LENGTH, None)  # the pipeline's encoding: cut longest first
    expected = _softmax(session.run(None, feeds)[0])  # (B, labels)

    client = Client(pair_port)
    status, answer = client.predict({"pairs": [list(p) for p in pairs], "truncate": True})
    assert status == 200, answer
    np.testing.assert_allclose(answer["scores"], expected, atol=1e-5)
    assert answer["labels"] == [NLI[k] for k in expected.argmax(-1)]
    assert answer["tokens"] == feeds["attention_mask"].sum(1).tolist() and max(answer["tokens"]) == MAX_LENGTH
    status, refused = client.predict({"pairs": [list(p) for p in pairs]})  # no truncate: the long pair is refused
    assert status == 413 and refused["error"].startswith("pairs[2] is ") and "at most 32" in refused["error"]


def test_pair_classifier_answers_tei_predict_rerank_and_kserve_as_v1_predict(
    pair_bundle: tuple[Path, Path], pair_port: int
) -> None:
    pairs = [[TEXTS[0], TEXTS[1]], [TEXTS[2], "the bank"], [TEXTS[3], TEXTS[4]]]
    client = Client(pair_port)
    expected = np.asarray(client.predict({"pairs": pairs})[1]["scores"])  # one run of all three

    def post(path: str, body: Any) -> tuple[int, Any]:
        return client.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})

    status, ranked = post("/predict", {"inputs": pairs})  # TEI: per pair, every label, best first
    assert status == 200 and len(ranked) == 3
    for row, scores in zip(ranked, expected, strict=True):
        assert [r["label"] for r in row] == [NLI[k] for k in np.argsort(-scores)]
        np.testing.assert_allclose(sorted(r["score"] for r in row), sorted(scores), atol=1e-5)
    status, one = post("/predict", {"inputs": pairs[0]})  # a single pair answers a single list
    assert status == 200 and {r["label"] for r in one} == set(NLI)

    request = {
        "inputs": [
            {"name": "text", "shape": [3], "datatype": "BYTES", "data": [p[0] for p in pairs]},
            {"name": "text_pair", "shape": [3, 1], "datatype": "BYTES", "data": [[p[1]] for p in pairs]},
        ]
    }
    status, answer = post("/v2/models/nli/infer", request)
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 3] and outputs["label"]["datatype"] == "BYTES"
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (3, 3)), expected, atol=1e-5)

    status, error = post("/rerank", {"query": TEXTS[0], "texts": [TEXTS[1], TEXTS[2]]})
    assert status == 422 and "--rerank-label" in error["error"]  # three labels: which one ranks?
    assert post("/v1/embeddings", {"input": "a"})[0] == 404
    port = free_port()
    proc = start_server(pair_bundle[1], port, "--rerank-label", "entailment", "--threads", "1")
    try:
        texts = [TEXTS[1], TEXTS[2], TEXTS[5]]
        status, ranked = Client(port).request(
            "POST", "/rerank", json.dumps({"query": TEXTS[0], "texts": texts, "return_text": True}).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 200 and sorted(r["index"] for r in ranked) == [0, 1, 2]
        alone = [Client(port).predict({"pairs": [[TEXTS[0], t]]})[1]["scores"][0][0] for t in texts]
        assert [r["index"] for r in ranked] == list(np.argsort(-np.asarray(alone)))
        assert all(r["text"] == texts[r["index"]] for r in ranked)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_a_tagger_says_plainly_which_routes_it_cannot_answer(tag_port: int) -> None:
    client = Client(tag_port)
    for path, body in (
        ("/predict", {"inputs": "the bank"}),
        ("/v1/embeddings", {"input": "the bank"}),
        ("/v2/models/pos/infer", {"inputs": []}),
    ):
        status, error = client.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        message = error["error"]["message"] if path == "/v1/embeddings" else error["error"]  # OpenAI's shape
        assert status == 404 and "/v1/predict" in message and "\n" not in message, (path, error)


def test_tagger_answers_one_tag_per_word_at_its_first_sub_token(tag_bundle: tuple[Path, Path], tag_port: int) -> None:
    run_dir, bundle = tag_bundle
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["input_kind"] == "words" and meta["labels"] == list(TAGS) and meta["task"] == "token-classification"
    artifact, session = _session(run_dir)
    sentences = [
        ("The", "cats", "sat", "on", "the", "mat."),  # cats -> cat ##s, mat. -> mat .
        ("a", "dog", "chasing", "balls"),
        tuple(LONG.split()),  # cut by truncation: its last words are not seen
    ]
    feeds = encoder(artifact)(sentences, MAX_LENGTH, None)
    probs = _softmax(session.run(None, feeds)[0])  # (B, S, tags)
    starts = word_starts(artifact, sentences, MAX_LENGTH)
    assert starts[0][2] - starts[0][1] == 2 and starts[2][-1] == -1  # a word of two sub-tokens; cut words

    client = Client(tag_port)
    status, answer = client.predict({"words": [list(s) for s in sentences], "truncate": True})
    assert status == 200, answer
    for i, first in enumerate(starts):
        assert answer["tags"][i] == [TAGS[probs[i, p].argmax()] if p >= 0 else None for p in first]
        for got, p in zip(answer["scores"][i], first, strict=True):
            assert (got is None) == (p < 0)
            if p >= 0:
                np.testing.assert_allclose(got, probs[i, p], atol=1e-5)
    assert answer["words_cut"] == [sum(p < 0 for p in first) for first in starts] and answer["words_cut"][2] > 0
    assert answer["tokens"] == feeds["attention_mask"].sum(1).tolist()

    status, split = client.predict({"texts": ["The cats sat on the mat."]})  # texts: split on whitespace
    assert status == 200 and split["words"] == [list(sentences[0])]
    status, alone = client.predict({"words": [list(sentences[0])]})
    assert status == 200 and split["tags"] == alone["tags"] and split["scores"] == alone["scores"]
    assert alone["words_cut"] == [0] and "words" not in alone


LONG_WORDS = LONG.split()
BAD_PAIR_REQUESTS = [
    ({"texts": ["a premise"]}, 422, 'this model takes text pairs, not "texts"'),
    ({"text": "a premise"}, 422, "takes text pairs"),
    ({"words": [["a"]]}, 422, "takes text pairs"),
    ({"pairs": [["a premise"]]}, 422, "pairs[0] must be a list of two strings"),
    ({"pairs": [["a", "b", "c"]]}, 422, "pairs[0] must be a list of two strings"),
    ({"pairs": ["a premise"]}, 422, "pairs[0] must be"),
    ({"pairs": [["a", " "]]}, 422, "pairs[0][1] is empty"),
    ({"pairs": [["a", 3]]}, 422, "pairs[0][1] is int, not a string"),
    ({"pairs": []}, 422, '"pairs" must be a non-empty list'),
    ({"pairs": {"a": "b"}}, 422, '"pairs" must be a non-empty list'),
    ({"pairs": [["a", "b"]], "truncate": 1}, 422, "truncate"),
    ({"pairs": [["a", "b"]], "top_k": 1}, 422, "unknown field 'top_k'"),
    ({"pairs": [["a", "b"]] * 9}, 413, "9 pairs in one request; the limit is 8"),
    ({"pairs": [[LONG, "b"]]}, 413, "pairs[0] is"),
    (["a", "b"], 422, "JSON object"),
]
BAD_TAG_REQUESTS = [
    ({"pairs": [["a", "b"]]}, 422, 'this model takes sentences of words, not "pairs"'),
    ({"words": [[]]}, 422, "words[0] must be a non-empty list of strings"),
    ({"words": ["the cat"]}, 422, "words[0] must be a non-empty list"),
    ({"words": [["the"], ["the", " "]]}, 422, "words[1][1] is empty"),
    ({"words": [["the", 5]]}, 422, "words[0][1] is int, not a string"),
    ({"words": [["the"]], "texts": ["the"]}, 422, "send exactly one of"),
    ({"texts": ["  "]}, 422, "texts[0] is empty"),
    ({"words": [["the"]] * 9}, 413, "9 sentences in one request"),
    ({"words": [LONG_WORDS]}, 413, "words[0] is"),
    ({"texts": [LONG]}, 413, "texts[0] is"),
]


@pytest.mark.parametrize(("kind", "body", "status", "needle"), [
    *(("pair", *case) for case in BAD_PAIR_REQUESTS), *(("words", *case) for case in BAD_TAG_REQUESTS),
])  # fmt: skip
def test_bad_requests_are_one_line_4xx_and_the_server_keeps_serving(
    request: pytest.FixtureRequest, kind: str, body: Any, status: int, needle: str
) -> None:
    port = request.getfixturevalue("pair_port" if kind == "pair" else "tag_port")
    client = Client(port)
    got, answer = client.predict(body)
    assert got == status and needle in answer["error"] and "\n" not in answer["error"], answer
    good = {"pairs": [["the cat sat", "a dog ran"]]} if kind == "pair" else {"words": [["the", "cat", "sat"]]}
    assert client.predict(good)[0] == 200  # the same connection still serves


def test_a_text_model_refuses_pairs_and_words_in_one_line() -> None:
    for body, needle in (
        ({"pairs": [["a", "b"]]}, 'this model takes single texts, not "pairs": send {"texts"'),
        ({"words": [["a"]]}, 'takes single texts, not "words"'),
    ):
        with pytest.raises(model_inputs.BadRequest, match=re.escape(needle)) as refused:
            model_inputs.parse_request(body, "text", 8)
        assert refused.value.status == HTTPStatus.UNPROCESSABLE_ENTITY and "\n" not in str(refused.value)
    ok = model_inputs.parse_request({"text": "a b"}, "text", 8)
    assert ok.examples == ["a b"] and ok.field == "texts" and not ok.split


def _edited(bundle: Path, tmp: Path, name: str, **changes: Any) -> Path:
    copy = tmp / name
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


def test_bundle_checks_of_the_input_kind_and_labels(pair_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = pair_bundle
    for name, changes, needle in (
        ("kind-unknown", {"input_kind": "image"}, "'input_kind' must be text, pair or words"),
        ("kind-for-task", {"input_kind": "words"}, "input_kind 'words' does not fit task classification"),
        ("kind-old-version", {"version": 2}, "input_kind pair needs bundle version 3"),
        ("labels-empty", {"labels": []}, "'labels' must be a non-empty list of strings"),
    ):
        with pytest.raises(BundleError, match=re.escape(needle)):
            load_metadata(_edited(bundle, tmp_path, name, **changes))
    with pytest.raises(BundleError, match="names 2 labels but the model scores 3"):
        server.Model(_edited(bundle, tmp_path, "labels-short", labels=["yes", "no"]), 1).warm_up()
    # A bundle written before input_kind (version 2, none recorded) still loads, as a model of single texts.
    older = server.Model(_edited(bundle, tmp_path, "older", version=2, input_kind=None), 1)
    older.warm_up()
    answer = older.predict(["the cat sat on the mat"])
    assert older.input_kind == "text" and answer["labels"][0] in NLI and len(answer["scores"][0]) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_the_server_tokenizes_pairs_and_words_as_the_pipeline_for_every_architecture(arch: str, tmp_path: Path) -> None:
    """The server reads tokenizer.json with the tokenizers library; the pipeline loads the folder through
    transformers (whose tokenizer classes may rebuild parts of it). Both must give the same arrays."""
    from compress.models import hf

    pairs = [(TEXTS[0], TEXTS[1]), (LONG, TEXTS[2]), (TEXTS[3], LONG)]
    sentences = [tuple(TEXTS[4].split()), ("The", "cats", "sat."), tuple(LONG.split())]
    for head, kind, examples in (("sequence", "pair", pairs), ("token", "words", sentences)):
        folder = build(arch, tmp_path / head, head=head)
        tokenizer = hf.load_tokenizer(folder)
        names = hf.input_names(tokenizer, hf.read_config(folder))
        expected = hf.encode(tokenizer, examples, MAX_LENGTH, names, kind=kind)
        request = model_inputs.Request(list(examples), True, model_inputs.FIELD[kind])
        encoder_ = model_inputs.TokenizerEncoder(folder, MAX_LENGTH)
        got = model_inputs.encode(encoder_, request, kind, list(names), MAX_LENGTH)
        for name in names:
            np.testing.assert_array_equal(got.feeds[name], expected[name], err_msg=f"{arch} {kind} {name}")
        if kind == "words":
            assert got.starts == hf.word_starts(tokenizer, examples, MAX_LENGTH), arch


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built here")
def test_a_modernbert_pair_classifier_with_our_windowed_op_is_packaged_and_served(tmp_path: Path) -> None:
    """ModernBERT's local layers (our WindowedAttention) and global layer (ONNX Runtime's
    MultiHeadAttention) go through export, int8, validate and package, and the server answers as the
    pipeline's session does."""
    model = build("modernbert", tmp_path / "mb", head="sequence", labels=NLI)
    rows = [{"premise": TEXTS[i], "hypothesis": TEXTS[(i * 5 + 1) % 12], "label": NLI[i % 3]} for i in range(12)]
    (tmp_path / "nli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation = {"path": str(tmp_path / "nli.jsonl"), "text_field": "premise", "text_pair_field": "hypothesis"}
    run_dir, bundle = _packaged(
        tmp_path, _recipe(tmp_path, "mb", "classification", model, {**evaluation, "label_field": "label"})
    )
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["custom_ops"] == ["WindowedAttention"] and meta["input_kind"] == "pair"
    artifact, session = _session(run_dir)
    pairs = [(TEXTS[0], TEXTS[1]), (LONG, TEXTS[5])]  # the second longer than the window (8 tokens)
    feeds = encoder(artifact)(pairs, MAX_LENGTH, None)
    expected = _softmax(session.run(None, feeds)[0])
    port = free_port()
    proc = start_server(bundle, port, "--threads", "1", "--ops-library", str(native.library_path()))
    try:
        status, answer = Client(port).predict({"pairs": [list(p) for p in pairs], "truncate": True})
    finally:
        proc.terminate()
    assert status == 200, answer
    np.testing.assert_allclose(answer["scores"], expected, atol=1e-5)
    assert proc.wait(timeout=10) == 0

"""Tiny random-init Hugging Face checkpoints of every encoder architecture we support, built offline.

`build(arch, folder)` writes config.json, model.safetensors and a tokenizer trained here with the
`tokenizers` library on the test texts (WordPiece, byte-level BPE or Unigram: whatever the architecture's
tokenizer class rebuilds itself from), so that `AutoTokenizer.from_pretrained(folder)` loads it and
yields the inputs the model takes. 2 layers, hidden 32, 4 heads, a vocabulary of a few hundred.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.conftest import TEXTS

ARCHS = ("bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra", "deberta-v2", "modernbert", "longformer")
POSITIONS = 64  # token positions of every tiny model (max_length in the tests is 32)
WINDOW = 8  # ModernBERT's local_attention and Longformer's attention_window: shorter than the test texts


@dataclass(frozen=True)
class Vocab:
    """How an architecture's tokenizer splits text, and its special tokens (the first ids, in this order)."""

    model: Literal["wordpiece", "bpe", "unigram"]
    tokenizer_class: str
    specials: tuple[str, ...]
    cls: str
    sep: str
    pad: str
    unk: str
    mask: str
    double_sep: bool = False  # RoBERTa-style pairs: <s> A </s></s> B </s>


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _bert_style(model: Literal["wordpiece", "bpe", "unigram"], tokenizer_class: str) -> Vocab:
    return Vocab(model, tokenizer_class, BERT_SPECIALS, "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")


def _roberta_style(model: Literal["wordpiece", "bpe", "unigram"], tokenizer_class: str, unk: str = "<unk>") -> Vocab:
    specials = tuple(unk if s == "<unk>" else s for s in ROBERTA_SPECIALS)
    return Vocab(model, tokenizer_class, specials, "<s>", "</s>", "<pad>", unk, "<mask>", double_sep=True)


VOCABS: dict[str, Vocab] = {
    "bert": _bert_style("wordpiece", "BertTokenizer"),
    "distilbert": _bert_style("wordpiece", "BertTokenizer"),
    "electra": _bert_style("wordpiece", "BertTokenizer"),
    "roberta": _roberta_style("bpe", "RobertaTokenizer"),
    "longformer": _roberta_style("bpe", "RobertaTokenizer"),
    "xlm-roberta": _roberta_style("unigram", "XLMRobertaTokenizer"),
    "mpnet": _roberta_style("wordpiece", "MPNetTokenizer", unk="[UNK]"),
    "deberta-v2": _bert_style("unigram", "DebertaV2Tokenizer"),
    # ModernBERT's checkpoints ship a generic tokenizer.json (byte-level BPE, [CLS] A [SEP] template).
    "modernbert": _bert_style("bpe", "PreTrainedTokenizerFast"),
}


def build(arch: str, folder: Path, head: str | None = None, labels: tuple[str, ...] = ("neg", "pos")) -> Path:
    """Write a tiny checkpoint of `arch` (a config model_type) into `folder`; with `head` ("sequence" or
    "token"), the classification model with id2label/label2id from `labels`. Returns the folder."""
    import torch
    import transformers
    from transformers import AutoConfig

    from compress.models.architectures import ARCHITECTURES

    folder.mkdir(parents=True, exist_ok=True)
    vocab = VOCABS[arch]
    # A byte-level BPE tagger's tokenizer adds a space before each pre-split word, as the word is in text.
    prefix_space = head == "token" and vocab.model == "bpe"
    tokenizer = _train_tokenizer(vocab, prefix_space)
    _save_tokenizer(tokenizer, vocab, folder, prefix_space)
    ids = {name: tokenizer.token_to_id(getattr(vocab, name)) for name in ("cls", "sep", "pad")}
    config = AutoConfig.for_model(arch, **_config(arch, tokenizer.get_vocab_size(), ids))
    if head is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    auto = getattr(transformers, ARCHITECTURES[arch].auto_classes[head])
    torch.manual_seed(0)
    model = auto.from_config(config, attn_implementation="eager")
    model.save_pretrained(folder)  # safetensors
    return folder


def _config(arch: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """The architecture's own config keywords for a 2-layer, hidden-32, 4-head model."""
    common = {"vocab_size": vocab_size, "max_position_embeddings": POSITIONS, "pad_token_id": ids["pad"]}
    bert_like = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    roberta_ids = {"bos_token_id": ids["cls"], "eos_token_id": ids["sep"]}
    # RoBERTa-style position ids start after the padding index: 2 positions more.
    offset = {"max_position_embeddings": POSITIONS + 2}
    configs: dict[str, dict[str, Any]] = {
        "bert": bert_like,
        "electra": {**bert_like, "embedding_size": 16},  # as ELECTRA-small: narrower embeddings, projected
        "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
        "roberta": {**bert_like, **roberta_ids, **offset, "type_vocab_size": 1},
        "xlm-roberta": {**bert_like, **roberta_ids, **offset, "type_vocab_size": 1},
        "mpnet": {**bert_like, **roberta_ids, **offset},
        # DeBERTa-v3: relative attention in both directions, log buckets, no absolute positions or types.
        "deberta-v2": {
            **bert_like,
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 16,
            "max_relative_positions": -1,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "position_biased_input": False,
            "type_vocab_size": 0,
        },
        # Layer 0 global, layer 1 local (a window of WINDOW tokens): both kinds of ModernBERT layer.
        "modernbert": {
            **bert_like,
            "local_attention": WINDOW,
            "global_attn_every_n_layers": 2,
            "bos_token_id": ids["cls"],
            "cls_token_id": ids["cls"],
            "eos_token_id": ids["sep"],
            "sep_token_id": ids["sep"],
        },
        "longformer": {
            **bert_like,
            **roberta_ids,
            **offset,
            "attention_window": [WINDOW, WINDOW],
            "type_vocab_size": 1,
        },
    }
    return {**common, **configs[arch]}


def _train_tokenizer(vocab: Vocab, prefix_space: bool = False) -> Any:
    """A tokenizers.Tokenizer trained on the test texts with the pipeline the tokenizer class rebuilds."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = list(vocab.specials)
    if vocab.model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=vocab.unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    elif vocab.model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
        )
        tok.decoder = decoders.Metaspace(prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=specials, unk_token=vocab.unk, show_progress=False
        )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    cls, sep = vocab.cls, vocab.sep
    pair_sep = f"{sep} {sep}" if vocab.double_sep else sep
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {pair_sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return tok


def _save_tokenizer(tok: Any, vocab: Vocab, folder: Path, prefix_space: bool = False) -> None:
    """tokenizer.json and a tokenizer_config.json naming the class and special tokens, as checkpoints ship."""
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": vocab.tokenizer_class,
        "model_max_length": POSITIONS,
        **{f"{name}_token": getattr(vocab, name) for name in ("cls", "sep", "pad", "unk", "mask")},
    }
    if vocab.model == "wordpiece":
        config["do_lower_case"] = True
    if vocab.tokenizer_class == "PreTrainedTokenizerFast":  # a generic class: the inputs are named here
        config["model_input_names"] = ["input_ids", "attention_mask"]
    if prefix_space:
        config["add_prefix_space"] = True
    if vocab.double_sep:  # RoBERTa-style tokenizers also name <s> and </s> as bos and eos
        config |= {"bos_token": vocab.cls, "eos_token": vocab.sep}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

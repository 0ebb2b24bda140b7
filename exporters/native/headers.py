"""ONNX Runtime's C API headers for building the native ops, fetched once into the cache.

The onnxruntime wheel ships no headers; Debian 13 (trixie) packages them as libonnxruntime-dev (1.21, an
85 KB .deb). apt-get fetches it with its own source list, lists, cache and configuration folders under a
temporary directory, so the system's apt state is neither read for packages nor changed; the .deb is
verified by apt against Debian's archive keyring and unpacked with dpkg-deb. Headers are never vendored.

EDGE_COMPRESS_ORT_INCLUDE=<folder holding onnxruntime_c_api.h> skips the fetch (other distributions);
EDGE_COMPRESS_DEBIAN_MIRROR=<archive URL> names the mirror when the apt sources name none.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from compress.data.cache import cache_dir
from compress.errors import UserError

PACKAGE = "libonnxruntime-dev"
SUITE = "trixie"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
C_API_HEADER = "onnxruntime_c_api.h"
# Host apt settings worth keeping when the host's configuration folder is swapped for an empty one.
_FORWARDED = ("Acquire::http::Proxy", "Acquire::https::Proxy", "Acquire::Check-Valid-Until", "Acquire::Check-Date")


def include_dir() -> Path:
    """The folder holding onnxruntime_c_api.h: $EDGE_COMPRESS_ORT_INCLUDE, else the cache, fetched on first use."""
    override = os.environ.get("EDGE_COMPRESS_ORT_INCLUDE")
    if override:
        folder = Path(override)
        if not (folder / C_API_HEADER).is_file():
            raise UserError(f"EDGE_COMPRESS_ORT_INCLUDE={override}: no {C_API_HEADER} there")
        return folder
    home = cache_dir() / "onnxruntime-headers"
    folder = home / "include"
    if (folder / C_API_HEADER).is_file():
        return folder
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=home) as tmp:
        staged = _fetch(Path(tmp))
        try:
            staged.rename(folder)  # atomic: a concurrent build may have won the race, which is fine
        except OSError:
            if not (folder / C_API_HEADER).is_file():
                raise
    return folder


def headers_version(include: Path) -> str:
    """What the headers are (the Debian package version when fetched), for the build record."""
    stamp = include / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else f"headers from {include}"


def _fetch(work: Path) -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError(
                f"building the native ops needs ONNX Runtime's headers, fetched with {tool}, which this system "
                f"lacks; set EDGE_COMPRESS_ORT_INCLUDE to a folder holding {C_API_HEADER} (ONNX Runtime 1.21+)"
            )
    if not KEYRING.is_file():
        raise UserError(f"{KEYRING} is missing: apt-get install debian-archive-keyring (to verify {PACKAGE})")
    mirror = _debian_mirror()
    empty = work / "empty"
    for sub in ("empty", "lists/partial", "cache/archives/partial", "deb"):
        (work / sub).mkdir(parents=True)
    (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    (work / "status").write_text("")
    options = {
        "Dir::Etc::SourceList": work / "sources.list",
        "Dir::Etc::SourceParts": empty,
        "Dir::Etc::Parts": empty,
        "Dir::Etc::PreferencesParts": empty,
        "Dir::State::Lists": work / "lists",
        "Dir::State::status": work / "status",
        "Dir::Cache": work / "cache",
        "APT::Sandbox::User": pwd.getpwuid(os.getuid()).pw_name,  # our folders are private to us
        **_host_settings(),
    }
    apt = ["apt-get", "-q", *[arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]]
    _run([*apt, "update"], f"apt-get update of Debian {SUITE} from {mirror}")
    _run([*apt, "download", PACKAGE], f"apt-get download {PACKAGE}", cwd=work / "deb")
    debs = sorted((work / "deb").glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise UserError(f"apt-get download {PACKAGE} produced no .deb in {work / 'deb'}")
    _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], f"dpkg-deb -x {debs[0].name}")
    source = work / "root" / "usr" / "include" / "onnxruntime"
    if not (source / C_API_HEADER).is_file():
        raise UserError(f"{debs[0].name} holds no usr/include/onnxruntime/{C_API_HEADER}")
    staged = work / "include"
    shutil.copytree(source, staged)
    version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"], "dpkg-deb -f").strip()
    (staged / "VERSION").write_text(f"{PACKAGE} {version} (Debian {SUITE})\n")
    return staged


def _debian_mirror() -> str:
    """The Debian archive the host's apt sources use (one-line or deb822 format), or $EDGE_COMPRESS_DEBIAN_MIRROR."""
    override = os.environ.get("EDGE_COMPRESS_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    etc = Path("/etc/apt")
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    files += sorted((etc / "sources.list.d").glob("*.sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        uris = re.findall(r"^URIs:\s*(.+)$", text, flags=re.MULTILINE)  # deb822
        uris = [u for line in uris for u in line.split()]
        uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, flags=re.MULTILINE)  # one-line
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise UserError(
        "no Debian archive in the apt sources (/etc/apt) to fetch ONNX Runtime's headers from; set "
        "EDGE_COMPRESS_DEBIAN_MIRROR to a Debian mirror URL or EDGE_COMPRESS_ORT_INCLUDE to a folder holding "
        f"{C_API_HEADER}"
    )


def _host_settings() -> dict[str, str]:
    """Proxy and validity settings from the host's apt configuration (its other parts are left out)."""
    if shutil.which("apt-config") is None:
        return {}
    proc = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        match = re.match(r'^(\S+) "(.*)";$', line)
        if match and match.group(1) in _FORWARDED and match.group(2):
            found[match.group(1)] = match.group(2)
    return found


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserError(f"fetching ONNX Runtime's headers: {what} failed: {last}")
    return proc.stdout

"""The software bill of materials of a runtime image: what is inside it, as CycloneDX 1.5 JSON.

Written into the image at /opt/edge-compress/sbom.json (and beside the build context): the Debian packages
of the base (name and version from each package's Debian changelog, read before the docs are stripped), the
Python wheels installed for the image's architecture (name, version and license from their METADATA), and
our own files (the server's modules and the native kernels, with their sha256).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from email.parser import Parser
from pathlib import Path
from typing import Any

CHANGELOG_HEAD = re.compile(r"^(\S+) \(([^)\s]+)\)")


def debian_packages(tree: Path, arch: str) -> list[dict[str, str]]:
    """Each package unpacked into `tree`: its name (the doc folder), source and version (its changelog's
    first line). A package with no changelog of its own (a doc folder that is a symlink) is left out."""
    found = []
    docs = tree / "usr" / "share" / "doc"
    for folder in sorted(docs.iterdir()) if docs.is_dir() else []:
        if folder.is_symlink():
            continue
        for name in (f"changelog.Debian.{arch}.gz", "changelog.Debian.gz"):
            log = folder / name
            if log.is_file():
                with gzip.open(log, "rt", encoding="utf-8", errors="replace") as f:
                    head = CHANGELOG_HEAD.match(f.readline())
                if head:
                    found.append({"name": folder.name, "source": head.group(1), "version": head.group(2)})
                break
    return found


def _wheels(site: Path) -> list[dict[str, Any]]:
    components = []
    for info in sorted(site.glob("*.dist-info")):
        meta = Parser().parsestr((info / "METADATA").read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name, ver = meta.get("Name", info.name), meta.get("Version", "")
        entry: dict[str, Any] = {
            "type": "library",
            "name": name,
            "version": ver,
            "purl": f"pkg:pypi/{name.lower()}@{ver}",
        }
        license_ = meta.get("License-Expression") or meta.get("License")
        if license_ and len(license_) < 100:
            entry["licenses"] = [{"expression" if meta.get("License-Expression") else "license": _license(meta)}]
        components.append(entry)
    return components


def _license(meta: Any) -> Any:
    if meta.get("License-Expression"):
        return meta["License-Expression"]
    return {"name": meta["License"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sbom(context: Path, arch: str, debian: list[dict[str, str]], tag: str) -> Path:
    """context/sbom.json for the runtime image `tag` built from `context` (site/, our files)."""
    components: list[dict[str, Any]] = [
        {
            "type": "library",
            "name": p["name"],
            "version": p["version"],
            "purl": f"pkg:deb/debian/{p['name']}@{p['version']}?arch={arch}&distro=debian-12",
        }
        for p in debian
    ]
    components += _wheels(context / "site")
    for path in sorted([*context.glob("*.py"), *context.glob("*.so")]):
        components.append(
            {
                "type": "file",
                "name": f"/opt/edge-compress/{path.name}",
                "hashes": [{"alg": "SHA-256", "content": _sha256(path)}],
            }
        )
    sbom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "component": {"type": "container", "name": tag, "properties": [{"name": "arch", "value": arch}]},
            "tools": {"components": [{"type": "application", "name": "edge-compress"}]},
        },
        "components": components,
    }
    out = context / "sbom.json"
    out.write_text(json.dumps(sbom, indent=1) + "\n")
    return out

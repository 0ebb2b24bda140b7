"""The runtime image's SBOM, from a base tree and a site folder laid out as the image builder leaves them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from compress.container.sbom import debian_packages, write_sbom


def test_sbom_names_debian_packages_wheels_and_our_files_with_hashes(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    for name, head in (
        ("python3.11-minimal", "python3.11 (3.11.2-6+deb12u6) bookworm-security; urgency=medium\n"),
        ("libstdc++6", "gcc-12 (12.2.0-14+deb12u1) bookworm; urgency=medium\n"),
    ):
        (tree / "usr/share/doc" / name).mkdir(parents=True)
        with gzip.open(tree / "usr/share/doc" / name / "changelog.Debian.gz", "wt") as f:
            f.write(head + "\n  * a change\n")
    (tree / "usr/share/doc/libpython3.11-stdlib").symlink_to("python3.11-minimal")  # no changelog of its own
    debian = debian_packages(tree, "amd64")
    assert debian == [
        {"name": "libstdc++6", "source": "gcc-12", "version": "12.2.0-14+deb12u1"},
        {"name": "python3.11-minimal", "source": "python3.11", "version": "3.11.2-6+deb12u6"},
    ]
    context = tmp_path / "context"
    info = context / "site" / "h11-0.16.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: h11\nVersion: 0.16.0\nLicense: MIT\n\nbody\n")
    (context / "server.py").write_text("print('serving')\n")
    sbom = json.loads(write_sbom(context, "amd64", debian, "edge-compress/runtime:x").read_text())
    named = {c["name"]: c for c in sbom["components"]}
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    assert named["h11"]["purl"] == "pkg:pypi/h11@0.16.0" and named["h11"]["licenses"] == [{"license": {"name": "MIT"}}]
    purl = "pkg:deb/debian/python3.11-minimal@3.11.2-6+deb12u6?arch=amd64&distro=debian-12"
    assert named["python3.11-minimal"]["purl"] == purl
    digest = named["/opt/edge-compress/server.py"]["hashes"][0]["content"]
    assert digest == "ee9277616e22719d32c73f0d2134cccf6e5ef0e345b203ef73c921a12bea3340"  # sha256 of the file

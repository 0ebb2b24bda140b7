"""The images: a Python base, the runtime (server + ONNX Runtime + our kernels) and a packaged model.

Everything is built locally; no registry is reachable, and none is needed:

- base `edge-compress/python:3.11-bookworm-ARCH`: Debian 12's python3.11 unpacked by mmdebstrap
  (--variant=extract: no package scripts run, so the arm64 base needs no emulation to build), plus a
  non-root user `edge` (10001). No shell, no package manager: nothing on the device beyond Python.
- runtime `edge-compress/runtime:VERSION-ARCH` (docker/runtime.Dockerfile): aarch64 / x86-64 wheels of
  onnxruntime, numpy and tokenizers at this machine's versions, installed by the host's pip for the
  image's platform; the native kernel library of our attention ops for that architecture; the server.
  No PyTorch.
- a model image (docker/model.Dockerfile): the runtime plus one bundle baked in at /model.

Images are built for linux/amd64 and linux/arm64 with Debian's docker client and BuildKit. arm64
containers run here under qemu-aarch64 through binfmt_misc, as a Neoverse-N1 with an ARM
/proc/cpuinfo (QEMU 7.2 would otherwise show the host's x86 one and pick its broken `max` CPU).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from compress.container.engine import CLIENT, Engine
from compress.container.host_tools import ensure_tools
from compress.container.sbom import debian_packages, write_sbom
from compress.data.cache import cache_dir
from compress.errors import UserError
from exporters.native.build import build as build_ops

Log = Callable[[str], object]
REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = REPO / "docker"
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}  # Docker's name -> ours
PLATFORMS = {
    "amd64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "arm64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
}
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "tokenizers", "uvicorn", "h11", "click", "prometheus_client")
USER = "edge:x:10001:10001:edge-compress server:/nonexistent:/usr/sbin/nologin"
EMULATED_CPU = "neoverse-n1"
DEBIAN_LIST = "debian-packages.json"  # beside rootfs.tar: what the SBOM says of the base
SERVER_FILES = (
    "server.py",
    "bundle_check.py",
    "model_inputs.py",
    "batcher.py",
    "http_app.py",
    "protocols.py",
    "transport.py",
)  # compress/serving/ -> /opt/edge-compress/
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # from qemu-user-static


def build_root() -> Path:
    """EDGE_COMPRESS_DOCKER_ROOT if set, else build/docker in the checkout."""
    return Path(os.environ.get("EDGE_COMPRESS_DOCKER_ROOT") or REPO / "build" / "docker").resolve()


def host_arch() -> str:
    return "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "amd64"


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise UserError(f"--arch {arch!r}: use amd64, arm64 or all")
    return arch


def base_tag(arch: str) -> str:
    return f"edge-compress/python:3.11-bookworm-{arch}"


def runtime_tag(arch: str) -> str:
    return f"edge-compress/runtime:{version('edge-compress')}-{arch}"


def arch_tag(image: str, arch: str) -> str:
    """NAME[:TAG] for one architecture of several: NAME:TAG-ARCH (NAME:ARCH without a tag)."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return f"{image}:{arch}"
    return f"{name}:{tag}-{arch}"


def docker(args: list[str], env: dict[str, str], what: str, timeout: float = 1800) -> str:
    """Run the docker client; a failure is a one-line UserError naming `what` and docker's last error."""
    proc = subprocess.run([CLIENT, *args], env=env, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
        raise UserError(f"docker: {what} failed ({errors[-1][-300:]})")
    return proc.stdout


def client_env() -> dict[str, str]:
    """The user's docker environment; when DOCKER_HOST is unset and our private engine runs, that one."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    if "DOCKER_HOST" not in env:
        private = Engine(build_root() / "engine")
        if private.pid() is not None:
            env["DOCKER_HOST"] = private.host
    return env


def engine_env() -> dict[str, str]:
    """client_env(), checked: a one-line error when no engine answers there."""
    env = client_env()
    if not Path(CLIENT).is_file():
        raise UserError(f"docker: no client at {CLIENT}; start an engine with `edge-compress docker start` (as root)")
    proc = subprocess.run(
        [CLIENT, "version", "-f", "{{.Server.Version}}"], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        where = env.get("DOCKER_HOST", "the default socket")
        raise UserError(f"docker: no engine answers at {where}; start one with `edge-compress docker start`")
    return env


def ensure_binfmt(log: Log) -> None:
    """Register qemu-aarch64 with binfmt_misc (fix-binary, so it works inside containers); x86-64 hosts only.

    A host-wide change that lasts until reboot: it says so before making it (and before installing
    qemu-user-static, through ensure_tools), and how to undo it.
    """
    if host_arch() == "arm64":
        return
    if (BINFMT_MISC / "qemu-aarch64").is_file():
        return
    ensure_tools(["qemu-aarch64-static"], log)
    if os.geteuid() != 0 or not BINFMT_CONF.is_file():
        raise UserError(
            "docker: arm64 images need qemu-aarch64 registered with binfmt_misc (as root, qemu-user-static)"
        )
    mount = not (BINFMT_MISC / "register").exists()
    log(
        f"registering qemu-aarch64 with binfmt_misc on this host ({BINFMT_CONF}, fix-binary"
        f"{'; mounting binfmt_misc at ' + str(BINFMT_MISC) if mount else ''}), so arm64 containers run; "
        f"until reboot, or `echo -1 > {BINFMT_MISC / 'qemu-aarch64'}`"
    )
    if mount:
        subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)], capture_output=True, check=False
        )
    try:
        (BINFMT_MISC / "register").write_text(BINFMT_CONF.read_text().strip() + "\n")
    except OSError as exc:
        raise UserError(f"docker: could not register qemu-aarch64 with binfmt_misc ({exc.strerror})") from None


def _rootfs(arch: str, log: Log) -> Path:
    """build/docker/ARCH/python/rootfs.tar: python3.11 for ARCH, the edge user, /tmp; made once."""
    out = build_root() / arch / "python"
    tar = out / "rootfs.tar"
    if tar.is_file() and (out / DEBIAN_LIST).is_file():
        return tar
    ensure_tools(["mmdebstrap"], log)
    if os.geteuid() != 0:
        raise UserError("docker: building the base image unpacks Debian packages with mmdebstrap; run as root")
    log(f"{arch}: Debian 12 python3.11 userland (mmdebstrap --variant=extract)")
    tree = out / "rootfs"
    shutil.rmtree(tree, ignore_errors=True)
    tree.parent.mkdir(parents=True, exist_ok=True)
    include = "python3.11-minimal,libpython3.11-stdlib,libstdc++6"
    cmd = ["mmdebstrap", "--mode=root", "--variant=extract", f"--architectures={arch}", f"--include={include}"]
    _run([*cmd, "bookworm", str(tree), "/etc/apt/sources.list.d/debian.sources"], "mmdebstrap")
    (out / DEBIAN_LIST).write_text(json.dumps(debian_packages(tree, arch), indent=1) + "\n")  # before the docs go
    for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(tree / junk, ignore_errors=True)
    (tree / "usr/bin/python3").unlink(missing_ok=True)
    (tree / "usr/bin/python3").symlink_to("python3.11")
    (tree / "etc/passwd").write_text(f"root:x:0:0:root:/root:/usr/sbin/nologin\n{USER}\n")
    (tree / "etc/group").write_text("root:x:0:\nedge:x:10001:\n")
    (tree / "tmp").mkdir(exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    partial = tar.with_suffix(".partial")
    _run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(partial), "."], "tar")
    partial.rename(tar)
    shutil.rmtree(tree, ignore_errors=True)
    return tar


def _site(arch: str, context: Path, log: Log) -> None:
    """ARCH wheels of the runtime packages, at this machine's versions, installed into context/site."""
    pins = [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]
    stamp = context / "site" / ".pins"
    if stamp.is_file() and stamp.read_text() == " ".join(pins):
        return
    log(f"{arch}: {', '.join(pins)} ({PLATFORMS[arch][0]} wheels)")
    shutil.rmtree(context / "site", ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", str(context / "site"), "--only-binary=:all:"]
    cmd += ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    cmd += [arg for p in PLATFORMS[arch] for arg in ("--platform", p)]
    _run([*cmd, *pins], "pip install")
    shutil.rmtree(context / "site" / "bin", ignore_errors=True)  # console scripts: no shell runs them
    stamp.write_text(" ".join(pins))


def build_runtime(arch: str, env: dict[str, str], log: Log) -> str:
    """Build (or refresh from cache) the base and runtime images of `arch`; returns the runtime tag."""
    check_arch(arch)
    if arch != host_arch():
        ensure_binfmt(log)
    tar = _rootfs(arch, log)
    log(f"{arch}: base image {base_tag(arch)}")
    docker(
        [
            "build",
            "-q",
            "--platform",
            f"linux/{arch}",
            "-f",
            str(DOCKERFILES / "python.Dockerfile"),
            "-t",
            base_tag(arch),
            str(tar.parent),
        ],
        env,
        f"building {base_tag(arch)}",
    )
    context = build_root() / arch / "runtime"
    context.mkdir(parents=True, exist_ok=True)
    _site(arch, context, log)
    try:
        library = build_ops(ARCHES[arch])
    except UserError as exc:
        raise UserError(f"docker: the {arch} image needs the native kernels of our attention ops: {exc}") from None
    shutil.copyfile(library, context / "libedgecompress_ops.so")
    for stale in context.glob("*.py"):
        stale.unlink()
    for name in SERVER_FILES:  # the server and the stdlib-only modules it imports from its own folder
        if (REPO / "compress" / "serving" / name).is_file():
            shutil.copyfile(REPO / "compress" / "serving" / name, context / name)
    tag = runtime_tag(arch)
    write_sbom(context, arch, json.loads((tar.parent / DEBIAN_LIST).read_text()), tag)  # -> /opt/edge-compress/
    log(f"{arch}: runtime image {tag}")
    docker(
        ["build", "-q", "--platform", f"linux/{arch}", "-f", str(DOCKERFILES / "runtime.Dockerfile"),
         "--build-arg", f"BASE_IMAGE={base_tag(arch)}", "-t", tag, "-t", f"edge-compress/runtime:{arch}", str(context)],
        env,
        f"building {tag}",
    )  # fmt: skip
    return tag


def registry_of(image: str) -> str | None:
    """The registry host an image name starts with (HOST[:PORT]/...), or None (Docker Hub's short names)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def push_multiarch(image: str, tags: list[str], env: dict[str, str], log: Log) -> str:
    """Push each architecture's tag, then one manifest list `image` over them (what `docker pull image`
    resolves per platform); returns the list's digest. A registry on loopback is spoken to over plain HTTP."""
    registry = registry_of(image)
    if registry is None:
        raise UserError(f"--push: {image} names no registry; write it as HOST[:PORT]/NAME[:TAG]")
    insecure = ["--insecure"] if registry.split(":")[0] in ("localhost", "127.0.0.1") else []
    env = {**env, "DOCKER_CLI_EXPERIMENTAL": "enabled"}  # `docker manifest` of the 20.10 client
    for tag in tags:
        log(f"pushing {tag}")
        docker(["push", tag], env, f"pushing {tag}")
    docker(["manifest", "create", "--amend", *insecure, image, *tags], env, f"creating the manifest list {image}")
    out = docker(["manifest", "push", "--purge", *insecure, image], env, f"pushing the manifest list {image}")
    return out.strip().splitlines()[-1] if out.strip() else ""


def build_model_image(bundle: Path, image: str, arch: str, env: dict[str, str], log: Log) -> str:
    """The runtime image of `arch` with `bundle` baked in at /model, tagged `image`."""
    runtime = build_runtime(arch, env, log)
    meta = json.loads((bundle / "metadata.json").read_text())
    labels = {
        "org.opencontainers.image.title": f"{meta['name']} ({meta['task']}, {meta['precision']})",
        "org.opencontainers.image.version": meta["edge_compress"],
        "io.edge-compress.model-sha256": meta["model_sha256"],
        "io.edge-compress.validated": str(meta["validated"]["passed"]).lower(),
    }
    log(f"{arch}: model image {image}")
    args = ["build", "-q", "--platform", f"linux/{arch}", "-f", str(DOCKERFILES / "model.Dockerfile")]
    args += ["--build-arg", f"RUNTIME_IMAGE={runtime}", "-t", image]
    args += [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    docker([*args, str(bundle)], env, f"building {image}")
    return image


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines or ["no output"]
        hint = " (no network to the package mirrors?)" if what in ("mmdebstrap", "pip install") else ""
        raise UserError(f"docker: {what} failed: {errors[0][-300:]}{hint}")


def pipeline_tag() -> str:
    return f"edge-compress/pipeline:{version('edge-compress')}"


def build_pipeline(env: dict[str, str], log: Log) -> str:
    """The amd64 pipeline image: a Debian minbase, a venv with the host's resolved wheels, kernels, data cache."""
    if host_arch() != "amd64":
        raise UserError("docker: the pipeline image is built for amd64, on an x86-64 host")
    out = build_root() / "amd64" / "debian"
    tar = out / "rootfs.tar"
    if not tar.is_file():
        ensure_tools(["mmdebstrap"], log)
        log("amd64: Debian 12 minbase with python3 and python3-venv (mmdebstrap)")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "rootfs.partial.tar"
        cmd = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--include=python3,python3-venv",
            "--architectures=amd64",
        ]
        cmd += ["--aptopt=APT::Install-Recommends false", "--dpkgopt=path-exclude=/usr/share/doc/*"]
        _run([*cmd, "bookworm", str(partial), "/etc/apt/sources.list.d/debian.sources"], "mmdebstrap")
        partial.rename(tar)
    docker(
        [
            "build",
            "-q",
            "-f",
            str(DOCKERFILES / "debian.Dockerfile"),
            "-t",
            "edge-compress/debian:bookworm-amd64",
            str(out),
        ],
        env,
        "building edge-compress/debian:bookworm-amd64",
    )
    context = build_root() / "amd64" / "pipeline"
    shutil.rmtree(context, ignore_errors=True)
    (context / "lib").mkdir(parents=True)
    log("amd64: wheels of torch 2.13.0 and edge-compress[demo] (pip wheel, from the host's index and cache)")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(context / "wheels"), "torch==2.13.0", f"{REPO}[demo]"]
    _run(cmd, "pip install")
    library = build_ops("x86_64")
    shutil.copytree(library.parent, context / "lib" / "x86_64")
    cache = cache_dir()
    shutil.copytree(cache, context / "cache", ignore=shutil.ignore_patterns("*.tmp*", "onnxruntime-headers"))
    tag = pipeline_tag()
    log(f"amd64: pipeline image {tag}")
    docker(
        ["build", "-q", "--network", "none", "-f", str(DOCKERFILES / "pipeline.Dockerfile"),
         "--build-arg", f"VERSION={version('edge-compress')}",
         "-t", tag, "-t", "edge-compress/pipeline:latest", str(context)],
        env,
        f"building {tag}",
    )  # fmt: skip
    shutil.rmtree(context / "wheels", ignore_errors=True)
    return tag

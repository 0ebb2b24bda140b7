"""A private Docker engine: its own socket, data root and PID, started and stopped without side effects.

    engine = Engine(Path("build/docker/engine"))
    engine.start(print)        # installs Debian's docker.io when missing (as root), waits until it answers
    engine.env()               # DOCKER_HOST and DOCKER_BUILDKIT for the docker client
    engine.stop()              # by its PID; then puts back the host networking the daemon changed

The daemon runs with no bridge, no iptables rules, no IP forwarding and no masquerading: containers use
--network none, or the host's network to serve on loopback. Host networking (forwarding sysctls,
network links, iptables rules) is recorded before the start and restored after the stop anyway, and
stop() says what it had to put back. See ../shared/notes/docker-engine.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import UserError

Log = Callable[[str], object]
CLIENT = "/usr/bin/docker"  # Debian's 20.10 client: BuildKit without buildx (the 28.x one on PATH lacks it)
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/bridge/bridge-nf-call-iptables")
DAEMON_FLAGS = ["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]


class Engine:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.socket = self.root / "docker.sock"
        if len(str(self.socket)) > 100:  # a unix socket path has at most 107 bytes
            import hashlib

            self.socket = Path(f"/tmp/edge-compress-docker-{hashlib.sha256(bytes(self.root)).hexdigest()[:12]}.sock")
        self.pidfile = self.root / "dockerd.pid"
        self.logfile = self.root / "dockerd.log"
        self.snapshot = self.root / "host-network.json"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def answers(self) -> bool:
        if not Path(CLIENT).is_file() or not self.socket.exists():
            return False
        proc = subprocess.run(
            [CLIENT, "version", "-f", "{{.Server.Version}}"],
            env=self.env(),
            capture_output=True,
            check=False,
            timeout=30,
        )
        return proc.returncode == 0

    def start(self, log: Log = print) -> None:
        """Start the daemon (or reuse the one already running on this root) and wait until it answers."""
        if self.pid() is not None and self.answers():
            return
        from compress.targets.emulated import ensure_tools

        ensure_tools(["dockerd"], log)
        self.root.mkdir(parents=True, exist_ok=True)
        self.snapshot.write_text(json.dumps(host_network()))
        cmd = ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec")]
        cmd += ["--pidfile", str(self.pidfile), "-H", self.host, *DAEMON_FLAGS]
        with self.logfile.open("a") as out:
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.answers():
                log(f"docker engine up ({self.host}, PID {self.pid()})")
                return
            time.sleep(0.5)
        errors = [ln for ln in self.logfile.read_text().splitlines() if "level=error" in ln or "failed" in ln]
        self.stop()
        raise UserError(
            f"docker: dockerd did not start in 60 s ({(errors or ['see ' + str(self.logfile)])[-1][-200:]})"
        )

    def stop(self) -> list[str]:
        """Stop the daemon by its PID, then restore the host networking recorded at start. Returns what it restored."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.2)
            if self.pid() is not None:
                os.kill(pid, signal.SIGKILL)
        restored: list[str] = []
        if self.snapshot.is_file():
            restored = restore_host_network(json.loads(self.snapshot.read_text()))
            self.snapshot.unlink()
        return restored


def host_network() -> dict[str, Any]:
    """The host networking dockerd may change: forwarding sysctls, network links, iptables rules."""
    sysctls = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        if path.is_file():
            sysctls[name] = path.read_text().strip()
    net = Path("/sys/class/net")
    links = sorted(p.name for p in net.iterdir()) if net.is_dir() else []
    rules: dict[str, str | None] = {}
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            proc = subprocess.run([tool], capture_output=True, text=True, check=False)
            rules[tool] = _rules(proc.stdout) if proc.returncode == 0 else None
        else:
            # Not installed (docker.io brings it): nothing has set rules through it, so the same as an
            # empty rule set; a snapshot taken before the engine's first setup then compares with one after.
            rules[tool] = _rules("")
    return {"sysctls": sysctls, "links": links, "rules": rules}


def _rules(text: str) -> str:
    """iptables-save output without its comments and packet counters, so two snapshots compare."""
    import re

    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in text.splitlines() if not ln.startswith("#")]
    return "\n".join(lines) + "\n"


def restore_host_network(before: dict[str, Any]) -> list[str]:
    """Put back what differs from `before`: sysctls, links dockerd added, iptables rules."""
    now = host_network()
    restored = []
    for name, value in before["sysctls"].items():
        if now["sysctls"].get(name) != value:
            (Path("/proc/sys") / name).write_text(value + "\n")
            restored.append(f"{name.replace('/', '.')}={value}")
    for link in sorted(set(now["links"]) - set(before["links"])):
        if link == "docker0" or link.startswith(("br-", "veth")):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
            restored.append(f"removed link {link}")
    for tool, rules in before["rules"].items():
        if rules is not None and now["rules"].get(tool) != rules:
            restore = tool.replace("-save", "-restore")
            subprocess.run([restore], input=rules, text=True, capture_output=True, check=False)
            restored.append(f"{restore}: rules put back")
    return restored

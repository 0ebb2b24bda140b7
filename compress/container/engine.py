"""A private Docker engine: its own socket, data root and PID, started and stopped without side effects.

    engine = Engine(Path("build/docker/engine"))
    engine.start(print)        # installs docker.io when missing (as root; says so first), waits until it answers
    engine.env()               # DOCKER_HOST and DOCKER_BUILDKIT for the docker client
    engine.stop()              # removes the networks made on this engine, then stops OUR dockerd by its PID

The daemon runs with no bridge, no iptables rules, no IP forwarding and no masquerading
(DAEMON_FLAGS): it changes nothing in the host's networking by itself. Containers use --network none,
or the host's network with the server bound to 127.0.0.1. What it can still create are networks a user
makes on this engine (a bridge network is a br-* link, plus veth pairs for its containers): stop()
removes those through our own socket before the daemon stops, so the daemon deletes its own links.

stop() never touches anything else on the host. It signals the pidfile's PID only when /proc/PID/cmdline
is a dockerd with our --data-root and -H socket (a stale pidfile whose PID now belongs to another
process is removed, and that process left alone). The host's networking (forwarding sysctls, links,
iptables rules) is recorded at start and compared after the stop; differences are reported, not
reverted: something else on the host may have made them. See docs/notes/docker-engine.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.container.host_tools import ensure_tools
from compress.errors import UserError

Log = Callable[[str], object]
CLIENT = "/usr/bin/docker"  # Debian's 20.10 client: BuildKit without buildx (the 28.x one on PATH lacks it)
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/bridge/bridge-nf-call-iptables")
DAEMON_FLAGS = ["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
BUILTIN_NETWORKS = ("bridge", "host", "none")
CHANGED = "changed since start, left as is: "


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

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def _pidfile_pid(self) -> int | None:
        """The PID the pidfile names, whoever holds it now (None without a readable pidfile)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def owns(self, pid: int) -> bool:
        """Whether `pid` is our dockerd: its executable is dockerd, with our --data-root and -H socket."""
        args = process_args(pid)
        if not args or Path(args[0]).name != "dockerd":
            return False
        return str(self.data_root) in flag_values(args, "--data-root") and self.host in (
            flag_values(args, "-H") + flag_values(args, "--host")
        )

    def pid(self) -> int | None:
        """Our dockerd's PID: the pidfile's, when that process runs and is our dockerd."""
        pid = self._pidfile_pid()
        return pid if pid is not None and self.owns(pid) else None

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

    def _client(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The docker client on OUR socket only (never the user's DOCKER_HOST)."""
        return subprocess.run([CLIENT, *args], env=self.env(), capture_output=True, text=True, check=False, timeout=120)

    def _drop_stale_pidfile(self) -> list[str]:
        """Remove a pidfile whose PID is not our dockerd (the process itself is left alone); says what it did."""
        pid = self._pidfile_pid()
        if not self.pidfile.exists() or (pid is not None and self.owns(pid)):
            return []
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return [f"removed an unreadable pidfile {self.pidfile}"]
        args = process_args(pid)
        if not args:
            return [f"removed the stale pidfile {self.pidfile} (PID {pid} no longer runs)"]
        what = " ".join(args)[:80]
        return [f"removed the stale pidfile {self.pidfile}: PID {pid} is not our dockerd ({what}), not signalled"]

    def start(self, log: Log = print) -> None:
        """Start the daemon (or reuse the one already running on this root) and wait until it answers."""
        if self.pid() is not None and self.answers():
            return
        ensure_tools(["dockerd"], log)
        self.root.mkdir(parents=True, exist_ok=True)
        for message in self._drop_stale_pidfile():  # dockerd refuses to start on a pidfile naming a live PID
            log(message)
        self.snapshot.write_text(json.dumps(host_network()))
        cmd = ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.root / "exec")]
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

    def remove_networks(self) -> list[str]:
        """Remove the networks made on this engine (containers disconnected first), so it deletes their links."""
        listed = self._client("network", "ls", "--filter", "type=custom", "--format", "{{.Name}}")
        if listed.returncode != 0:
            return [f"could not list the engine's networks ({_last_line(listed)})"]
        messages = []
        for name in [n.strip() for n in listed.stdout.splitlines() if n.strip() not in ("", *BUILTIN_NETWORKS)]:
            inspect = self._client("network", "inspect", "-f", "{{range $id, $c := .Containers}}{{$id}} {{end}}", name)
            for cid in inspect.stdout.split() if inspect.returncode == 0 else []:
                self._client("network", "disconnect", "-f", name, cid)
            removed = self._client("network", "rm", name)
            if removed.returncode == 0:
                messages.append(f"removed network {name} (ours)")
            else:
                messages.append(f"could not remove network {name} (ours): {_last_line(removed)}")
        return messages

    def stop(self) -> list[str]:
        """Remove our engine's networks, stop OUR dockerd by its PID (and unmount what it left mounted under its
        own exec root), report host networking changed since start.

        Returns one line per thing done or noticed; an empty list means nothing needed doing and the host's
        networking is as it was at start. Nothing outside this engine is signalled, deleted or reverted.
        """
        messages = self._drop_stale_pidfile()
        pid = self.pid()
        if pid is not None:
            if self.answers():
                messages += self.remove_networks()
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.2)
            if self.pid() is not None:
                self._signal(pid, signal.SIGKILL)
                messages.append(f"dockerd (PID {pid}) did not stop in 30 s on SIGTERM: killed")
                time.sleep(0.5)
            if self.pidfile.exists() and self.pid() is None:
                self.pidfile.unlink(missing_ok=True)  # dockerd removes it on a clean exit, not when killed
        if self.pid() is None:
            messages += self._unmount_leftovers()
        if self.snapshot.is_file():
            messages += [CHANGED + change for change in network_changes(json.loads(self.snapshot.read_text()))]
            self.snapshot.unlink()
        return messages

    def _unmount_leftovers(self) -> list[str]:
        """Unmount what our dockerd left mounted under its own exec root: it keeps the bind mount of its network
        namespace (exec/netns/default) after a clean exit, which outlived every stop and kept `rm -rf build`
        from working. Only mount points under our exec root are touched; a failure is reported, not raised."""
        root = str((self.root / "exec").resolve())
        points = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
        messages = []
        for point in sorted(points, key=len, reverse=True):  # the deepest first
            proc = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                messages.append(f"could not unmount {point} ({proc.stderr.strip()}): unmount it by hand")
        return messages

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        """Signal `pid` only if it is still our dockerd (checked right before, against PID reuse)."""
        if self.owns(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def process_args(pid: int) -> list[str]:
    """The command line of process `pid` (empty when it does not run, or is a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values of `flag` in `args`, written `--flag VALUE` or `--flag=VALUE`."""
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")]
    return values + [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return (lines or ["no output"])[-1][-200:]


def host_network() -> dict[str, Any]:
    """The host networking a Docker engine may change: forwarding sysctls, network links, iptables rules."""
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


def network_changes(before: dict[str, Any], now: dict[str, Any] | None = None) -> list[str]:
    """What differs between `before` and `now` (default: the host now), one line each. Only read, never undone."""
    now = host_network() if now is None else now
    changes = []
    for name in sorted(set(before.get("sysctls", {})) | set(now["sysctls"])):
        old, new = before.get("sysctls", {}).get(name), now["sysctls"].get(name)
        if old != new:
            changes.append(f"{name.replace('/', '.')} {old} -> {new}")
    added = sorted(set(now["links"]) - set(before.get("links", [])))
    gone = sorted(set(before.get("links", [])) - set(now["links"]))
    if added:
        changes.append(f"new network link{'s' * (len(added) > 1)} {', '.join(added)}")
    if gone:
        changes.append(f"network link{'s' * (len(gone) > 1)} {', '.join(gone)} gone")
    for tool, rules in before.get("rules", {}).items():
        if rules is not None and now["rules"].get(tool) not in (None, rules):
            changes.append(f"{tool.replace('-save', '')} rules differ (compare with `{tool}`)")
    return changes

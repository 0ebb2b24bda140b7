"""A validation target: where the worker script runs, how to set that place up, and whether it is healthy."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

from compress.errors import StageFailed

WORKER = Path(__file__).with_name("worker.py")
Progress = Callable[[str, int, int], object]
Log = Callable[[str], object]


class Target:
    """One place the artifact runs. Subclasses say how the worker is started and how setup is done."""

    name: str
    arch: Literal["x86_64", "aarch64"]
    kind: Literal["native", "emulated", "docker"]
    cpu: str  # what CPU the target is (a model name, or "this machine")
    vnni: bool | None = None  # x86-64: whether the u8s8 kernels have VNNI (None: not x86, or unknown)
    timeout_s = 3600

    @property
    def emulated(self) -> bool:
        """Whether this target's CPU is emulated (its latency says nothing about real hardware)."""
        return self.kind == "emulated"

    def problem(self) -> str | None:
        """None when the target can run now, else what is missing and the command that fixes it."""
        return None

    def setup(self, log: Log) -> None:
        """Build and cache this target's environment (idempotent), then check its health."""

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def killed(self, job_dir: Path) -> None:
        """The worker's process group was killed: stop whatever it started outside the group (none here)."""

    def cpu_features(self, reported: list[str]) -> list[str]:
        """The CPU features this target has, given those its worker reported."""
        return reported

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, {self.cpu})"

    def run(self, job_dir: Path, job: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Run the worker on `job_dir` (models and inputs already there) and return its result.

        A failure inside the target is a StageFailed naming the target and the worker's last error line.
        `timeout_s` bounds the whole run (wall clock): a worker still running then, printing or not, is
        killed with its whole process group, and that is a StageFailed too.
        """
        job_dir = job_dir.resolve()  # the worker runs with job_dir as its working directory
        (job_dir / "job.json").write_text(json.dumps(job))
        shutil.copyfile(WORKER, job_dir / "worker.py")
        cmd, env = self.command(job_dir)
        with (job_dir / "stderr.txt").open("w+") as stderr:  # a file, not a pipe: it cannot fill and block
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                cwd=job_dir,
                bufsize=1,
                start_new_session=True,  # its own process group: a timeout kills the worker's children too
            )
            assert proc.stdout is not None
            queued: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc.stdout, queued), daemon=True)
            reader.start()
            try:
                last = _follow(proc, queued, time.monotonic() + self.timeout_s, progress)
            finally:
                if proc.returncode is None:  # timed out, or the progress callback raised: never leave it running
                    _kill_group(proc)
                    self.killed(job_dir)
                reader.join(timeout=5)  # the group is dead: its end of the pipe is closed, the reader at EOF
                if not reader.is_alive():
                    proc.stdout.close()
            stderr.seek(0)
            err = stderr.read()
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
        if last is None:
            why = f"; its last error line: {lines[-1][:300]}" if lines else ""
            raise StageFailed(f"target {self.name}: the worker did not finish within {self.timeout_s} s (killed{why})")
        if proc.returncode != 0:
            raise StageFailed(f"target {self.name}: the worker failed ({(lines or ['no output'])[-1]})")
        try:
            result: dict[str, Any] = json.loads(last)
        except json.JSONDecodeError:
            raise StageFailed(f"target {self.name}: the worker printed no result (last line: {last[:300]!r})") from None
        return result


def _follow(
    proc: subprocess.Popen[str], lines: queue.Queue[str | None], deadline: float, progress: Progress | None
) -> str | None:
    """Stream the worker's stdout lines until it exits: its last non-progress line, or None past `deadline`.

    The lines come from a reader thread through a queue, so a worker that hangs with its stdout open
    (printing nothing, never exiting) cannot block past the deadline.
    """
    last = ""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            return None
        if line is None:  # end of stdout
            break
        parts = line.split()
        if len(parts) == 4 and parts[0] == "progress" and parts[2].isdigit() and parts[3].isdigit():
            if progress is not None:
                progress(parts[1], int(parts[2]), int(parts[3]))
        elif line.strip():
            last = line.strip()
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return None
    return last


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Reader thread: every line of `stream` into `lines`, then None at end of file."""
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):  # the pipe was closed under us (the worker was killed)
        pass
    finally:
        lines.put(None)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the worker's process group (it leads its own session) and reap the worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()  # the group is gone already; the worker itself at most is left to reap
    with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (stuck in the kernel): nothing more to do
        proc.wait(timeout=10)

"""A validation target: where the worker script runs, how to set that place up, and whether it is healthy."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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

    def cpu_features(self, reported: list[str]) -> list[str]:
        """The CPU features this target has, given those its worker reported."""
        return reported

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, {self.cpu})"

    def run(self, job_dir: Path, job: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Run the worker on `job_dir` (models and inputs already there) and return its result.

        A failure inside the target is a StageFailed naming the target and the worker's last error line.
        """
        job_dir = job_dir.resolve()  # the worker runs with job_dir as its working directory
        (job_dir / "job.json").write_text(json.dumps(job))
        shutil.copyfile(WORKER, job_dir / "worker.py")
        cmd, env = self.command(job_dir)
        last = ""
        with (job_dir / "stderr.txt").open("w+") as stderr:  # a file, not a pipe: it cannot fill and block
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=job_dir, bufsize=1
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("progress ") and progress is not None:
                    _, phase, done, total = line.split()
                    progress(phase, int(done), int(total))
                elif line.strip():
                    last = line.strip()
            code = proc.wait(timeout=self.timeout_s)
            stderr.seek(0)
            err = stderr.read()
        if code != 0:
            lines = [ln for ln in err.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
            raise StageFailed(f"target {self.name}: the worker failed ({(lines or ['no output'])[-1].strip()})")
        result: dict[str, Any] = json.loads(last)
        return result

"""Issue 20, item 9: the validation worker's timeout holds for a hung worker; write_atomic is durable.

The targets here run a small Python script instead of the real worker, so no model or ONNX Runtime is needed.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from compress.data.cache import write_atomic
from compress.errors import StageFailed
from compress.targets.base import Target


class ScriptTarget(Target):
    """A target whose "worker" is `python -c SCRIPT`, run in the job folder."""

    name = "script"
    arch = "x86_64"
    kind = "native"
    cpu = "this machine's CPU"

    def __init__(self, script: str, timeout_s: int = 2) -> None:
        self.script = script
        self.timeout_s = timeout_s

    def command(self, job_dir: Path) -> tuple[list[str], dict[str, str] | None]:
        return [sys.executable, "-c", self.script, str(job_dir)], None


def _gone(pid: int) -> bool:
    """Whether process `pid` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


def _wait_gone(pid: int, seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


HANG = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
with open("pids", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
time.sleep(1000)
"""


def test_a_silent_hung_worker_is_killed_at_the_timeout(tmp_path: Path) -> None:
    """A worker that prints nothing and never exits: StageFailed at timeout_s, its whole group killed."""
    start = time.monotonic()
    with pytest.raises(StageFailed) as info:
        ScriptTarget(HANG, timeout_s=2).run(tmp_path, {"mode": "probe"})
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert message.startswith("target script: the worker did not finish within 2 s")
    assert "\n" not in message
    worker, child = (int(p) for p in (tmp_path / "pids").read_text().split())
    assert _wait_gone(worker), "the worker still runs"
    assert _wait_gone(child), "the worker's child still runs (the process group was not killed)"


def test_progress_before_a_hang_is_still_delivered(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "print('progress encode 1 4', flush=True)\n"
        "print('progress encode 2 4', flush=True)\n"
        "time.sleep(1000)\n"
    )
    seen: list[tuple[str, int, int]] = []
    start = time.monotonic()
    with pytest.raises(StageFailed, match="did not finish within 2 s"):
        ScriptTarget(script).run(tmp_path, {}, lambda phase, done, total: seen.append((phase, done, total)))
    assert time.monotonic() - start < 5
    assert seen == [("encode", 1, 4), ("encode", 2, 4)]


def test_a_steady_printer_cannot_outlive_the_timeout(tmp_path: Path) -> None:
    """The deadline is wall clock over the whole run, not per line: progress every 0.1 s does not extend it."""
    script = "import time\nwhile True:\n    print('progress run 1 2', flush=True)\n    time.sleep(0.1)\n"
    seen: list[str] = []
    start = time.monotonic()
    with pytest.raises(StageFailed, match="did not finish within 2 s"):
        ScriptTarget(script).run(tmp_path, {}, lambda *args: seen.append(args[0]))
    assert time.monotonic() - start < 5
    assert len(seen) >= 5


def test_a_finished_worker_returns_its_result_and_streams_progress(tmp_path: Path) -> None:
    script = (
        "import json\n"
        "for i in range(3):\n"
        "    print(f'progress latency {i + 1} 3', flush=True)\n"
        "print(json.dumps({'machine': 'x86_64', 'ok': True}))\n"
    )
    seen: list[tuple[str, int, int]] = []
    result: dict[str, Any] = ScriptTarget(script, timeout_s=30).run(
        tmp_path, {}, lambda phase, done, total: seen.append((phase, done, total))
    )
    assert result == {"machine": "x86_64", "ok": True}
    assert seen == [("latency", 1, 3), ("latency", 2, 3), ("latency", 3, 3)]


def test_a_failing_worker_names_its_last_error_line(tmp_path: Path) -> None:
    script = "import sys\nprint('progress x 1 2', flush=True)\nsys.exit('boom: no onnxruntime')\n"
    with pytest.raises(StageFailed, match=r"^target script: the worker failed \(boom: no onnxruntime\)$"):
        ScriptTarget(script, timeout_s=30).run(tmp_path, {})


def test_a_raising_progress_callback_leaves_no_worker_behind(tmp_path: Path) -> None:
    script = "import os, time\nopen('pids', 'w').write(str(os.getpid()))\nprint('progress x 1 2', flush=True)\n"
    script += "time.sleep(1000)\n"

    def stop(phase: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ScriptTarget(script, timeout_s=60).run(tmp_path, {}, stop)
    assert _wait_gone(int((tmp_path / "pids").read_text()))


# ------------------------------------------------------------------------------------ write_atomic
def _record_fsync(monkeypatch: pytest.MonkeyPatch, target: Path, fail: str | None = None) -> list[tuple[str, bool]]:
    """Replace os.fsync: record (file or dir, whether `target` existed then); raise OSError for kind `fail`."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append((kind, target.exists()))
        if kind == fail:
            raise OSError(22, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "sub" / "data.bin"
    calls = _record_fsync(monkeypatch, target)
    write_atomic(target, b"payload")
    assert target.read_bytes() == b"payload"
    assert calls == [("file", False), ("dir", True)]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_write_atomic_tolerates_a_folder_that_refuses_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    calls = _record_fsync(monkeypatch, target, fail="dir")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [kind for kind, _ in calls] == ["file", "dir"]


def test_write_atomic_leaves_no_temp_file_when_fsync_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    _record_fsync(monkeypatch, target, fail="file")
    with pytest.raises(OSError, match="Invalid argument"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"  # the old content is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_write_atomic_leaves_no_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty folder where the file should go
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert target.is_dir()


def test_a_timed_out_worker_calls_the_targets_cleanup(tmp_path: Path) -> None:
    """What a worker started outside its process group (a container) is stopped too: killed() is called."""
    calls: list[Path] = []

    class Recorded(ScriptTarget):
        def killed(self, job_dir: Path) -> None:
            calls.append(job_dir)

    with pytest.raises(StageFailed):
        Recorded("import time; time.sleep(1000)", timeout_s=1).run(tmp_path, {"mode": "probe"})
    assert calls == [tmp_path.resolve()]


def test_a_docker_job_runs_under_a_name_it_can_be_killed_by(tmp_path: Path) -> None:
    from compress.targets.docker import DockerTarget

    target = DockerTarget("edge-compress/runtime:amd64")
    cmd, _ = target.command(tmp_path)
    name = cmd[cmd.index("--name") + 1]
    assert name == target._container(tmp_path) and name.startswith("edge-compress-job-")
    assert target._container(tmp_path / "other") != name

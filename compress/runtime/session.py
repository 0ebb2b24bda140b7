"""An ONNX Runtime CPU session for our artifacts: fixed threads, the artifact's settings, our ops' kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporters import native as custom_ops


def session(
    model: Path,
    threads: int,
    settings: dict[str, Any] | None = None,
    optimized_path: Path | None = None,
    idle_spinning: bool = True,
) -> Any:
    """An ONNX Runtime CPU session with the artifact's own session settings (see session.json).

    idle_spinning=False: intra-op threads spin while a run is in progress and stop when it ends
    (`session.force_spinning_stop`), as the server's sessions do. Timed sessions need it: sessions timed
    in turn on a 2-core machine otherwise steal each other's cores while idle (measured here: the same
    model ran 2-3x slower interleaved with a spinning neighbour). Turning spinning off altogether
    (`allow_spinning=0`, what timed sessions did before) slows every run instead: each node's parallel
    section then wakes its threads from sleep (all-MiniLM-L6-v2 int8, 128 tokens, 2 threads, AMD Zen 5:
    4.64 ms with spinning off against 3.45 ms spinning during runs, interleaved; fp32 9.73 against 8.05).
    """
    import onnxruntime as ort

    settings = settings or {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not idle_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")

    custom_ops.register(so)  # our attention ops' native kernels, when built for this machine
    for key, value in settings.get("config_entries", {}).items():
        so.add_session_config_entry(key, str(value))
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        str(model),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(settings.get("disabled_optimizers", [])),
    )

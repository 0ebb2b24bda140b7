"""Third-party loggers edge-compress quiets, explicitly and only while one of its entry points runs.

transformers imports torchao (our QAT stage's library) whenever it is installed; torchao then warns about
CUDA-only kernels it cannot load on a CPU, and torch about pytree registrations: noise to a user, who
reads what matters in the report. The CLI's commands and the Python API's runs wrap themselves in
`quiet_library_logs()`; the levels are put back when they return.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

NOISY = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

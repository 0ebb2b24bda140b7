"""Where validation runs. Native x86-64 now; emulated x86-64 (AVX2) and aarch64 arrive with issue 8."""

from __future__ import annotations

from compress.targets import native

TARGETS = {"x86_64": native}

__all__ = ["TARGETS"]

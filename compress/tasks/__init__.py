"""Tasks decide what a model outputs when exported and how it is scored. One registry, a dict literal."""

from __future__ import annotations

from compress.tasks import embedding

TASKS = {"embedding": embedding}

__all__ = ["TASKS"]

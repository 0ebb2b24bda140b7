"""Sentence embedding: pooled, normalised encoder states; scored on human-rated pairs (Spearman/Pearson)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compress.data.sets import ScoredPairs
from compress.models.spec import HFModel, PackageModel
from compress.tasks.metrics import correlations

if TYPE_CHECKING:
    import torch

OUTPUT_NAMES = ("embedding",)


def build_module(encoder: torch.nn.Module, spec: HFModel | PackageModel, names: tuple[str, ...]) -> torch.nn.Module:
    """Wrap an encoder so that it maps token ids to one embedding per text, as deployed."""
    import torch

    pooling, normalize = spec.pooling, spec.normalize
    with_types = "token_type_ids" in names

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            extra = {"token_type_ids": token_type_ids} if with_types else {}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            return self.pool(hidden, attention_mask)

        def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """(B, S, D) token states -> (B, D) embedding, as deployed."""
            if pooling == "cls":
                pooled = hidden[:, 0]  # (B, D)
            else:
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, D)
            return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    return SentenceEmbedding().eval()


def pair_similarities(embeddings: np.ndarray, data: ScoredPairs) -> np.ndarray:
    """Cosine similarity of each scored pair."""
    norm = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)  # (N, D)
    left = np.array([i for i, _ in data.pairs])
    right = np.array([j for _, j in data.pairs])
    return np.asarray((norm[left] * norm[right]).sum(axis=1))


def score(embeddings: np.ndarray, data: ScoredPairs, seed: int = 0) -> dict[str, Any]:
    """Spearman and Pearson against the human scores, each with a bootstrap 95% interval."""
    return correlations(pair_similarities(embeddings, data), np.asarray(data.scores), seed=seed)

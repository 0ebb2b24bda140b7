"""Distillation losses and students made from a teacher by layer dropping.

Losses (weights in DistillLosses; each written to be checked against a hand computation):
- embedding cosine / MSE between pooled embeddings (works on unlabeled text);
- soft-target KL at temperature T, scaled by T^2 (Hinton et al. 2015), and hard-label cross-entropy;
- hidden-state MSE at mapped layers (TinyBERT, Jiao et al. 2020);
- attention-distribution KL at mapped layers (MiniLM, Wang et al. 2020).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.models.structure import encoder_of


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student_i, teacher_i) over the batch."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) · T², batch mean: gradients keep their scale as T changes (Hinton 2015)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    p_teacher = F.softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows (B, H, S, S), averaged over real query rows and heads."""
    eps = 1e-12
    kl = (teacher * ((teacher + eps).log() - (student + eps).log())).sum(-1)  # (B, H, S)
    rows = key_mask[:, None, :].to(kl.dtype)  # (B, 1, S)
    return (kl * rows).sum() / (rows.sum() * kl.shape[1])


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """MSE of hidden states (B, S, D) over real tokens."""
    err = ((student - teacher) ** 2).mean(-1)  # (B, S)
    m = key_mask.to(err.dtype)
    return (err * m).sum() / m.sum()


def hidden_relative(student: torch.Tensor, teacher: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Squared error of hidden states (B, S, D) over real tokens, relative to the teacher's energy there:
    scale-free, so layers whose states are larger (outlier features) do not outweigh the others."""
    m = key_mask.to(student.dtype)[..., None]
    return (((student - teacher) ** 2) * m).sum() / ((teacher**2) * m).sum().clamp_min(1e-12)


def uniform_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Student layer i learns from teacher layer round((i + 1) · T / S) - 1: the last maps to the last."""
    return tuple(round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers))


def check_map(layer_map: tuple[int, ...], student_layers: int, teacher_layers: int) -> None:
    if len(layer_map) != student_layers:
        raise UserError(f"distill.layer_map has {len(layer_map)} entries for a {student_layers}-layer student")
    bad = [j for j in layer_map if not 0 <= j < teacher_layers]
    if bad:
        raise UserError(f"distill.layer_map: teacher layer {bad[0]} is out of range 0..{teacher_layers - 1}")


def drop_layers(encoder: Any, keep: tuple[int, ...]) -> Any:
    """A copy of a BERT-family encoder (or of a model with a task head on one: the head is copied whole)
    keeping layers `keep` (weights copied), with its config updated."""
    layers = encoder_of(encoder).encoder.layer
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad or not keep:
        raise UserError(f"distill: cannot keep layers {list(keep)} of a {len(layers)}-layer model")
    student = copy.deepcopy(encoder).requires_grad_(True)  # a student is trained, whatever the source was
    base = encoder_of(student)
    base.encoder.layer = torch.nn.ModuleList(base.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = len(keep)
    structure = getattr(student.config, "edge_compress_structure", None)
    if structure:  # a pruned model: the per-layer sizes follow the kept layers
        student.config.edge_compress_structure = {k: [v[i] for i in keep] for k, v in structure.items()}
    for index, layer in enumerate(base.encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    return student


def held_out_rows(n: int, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) row indices, sorted: a seeded 10% (at least 16) of n texts held out of training,
    to keep the epoch closest to the teacher on texts it did not train on."""
    order = np.random.default_rng(seed).permutation(n)
    held = held_out_count(n)
    return np.sort(order[held:]), np.sort(order[:held])


def held_out_count(n: int) -> int:
    return max(16, n // 10)

"""The training loop: AdamW, warm-up then decay, gradient clipping, per-epoch checkpoints, resume, early stop.

A checkpoint is a folder `epoch-NNN/` written through a temporary name and a rename: model weights,
optimizer moments and the RNG state as safetensors (nothing pickled), the loop's state as JSON. A run
killed at any moment resumes from the last complete epoch and, with the same thread count, ends with
the same weights as an uninterrupted run: data order is a function of (seed, epoch) and the RNG state
(dropout) is restored.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import distributed
from compress.context import Context
from compress.data.cache import write_atomic
from compress.models.zoo import load_zoo, save_zoo
from compress.training import ddp
from compress.training.settings import TrainingSettings

Batch = dict[str, torch.Tensor]


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, metric: str) -> dict[str, Any]:
        """What a training stage reports about its loop: epochs, the best epoch and its metric, history."""
        return {
            "epochs_run": self.epoch,
            "best_epoch": self.best_epoch,
            f"best_{metric}": self.best_metric,
            "history": self.history,
            "steps": self.step,
        }


@dataclass(frozen=True)
class Persistence:
    """How the loop writes and reads the model of a checkpoint (zoo folders, or Hugging Face folders)."""

    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]


ZOO = Persistence(save=save_zoo, load=load_zoo)


@dataclass(frozen=True)
class StepHooks:
    """Extra work in the loop (gradual pruning): after each optimizer step, and which epochs may be best."""

    after_step: Callable[[Any, int], None]  # (model, steps done)
    eligible: Callable[[int], bool]  # steps done at an epoch's end -> may this epoch be the best one?


@dataclass(frozen=True)
class Evaluation:
    """What the loop optimises: a metric name, whether higher is better, and how to compute it."""

    name: str
    higher_is_better: bool
    run: Callable[[Any], dict[str, Any]]


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then linear or cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit(
    model: Any,
    cfg: TrainingSettings,
    *,
    batches: Callable[[np.ndarray], Iterator[Batch]],
    n_train: int,
    evaluation: Evaluation,
    work: Path,
    ctx: Context,
    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
    persistence: Persistence = ZOO,
    hooks: StepHooks | None = None,
) -> tuple[Any, LoopState]:
    """Train `model`, resuming from `work` if it holds checkpoints; returns the best model and the loop state.

    loss_fn(model, batch) defaults to model.loss(batch); persistence to zoo checkpoints.
    """
    compute_loss = loss_fn or (lambda m, b: m.loss(b))
    multi = distributed.active()
    # Under torchrun the processes share the machine's cores: split the thread budget between them.
    torch.set_num_threads(max(1, cfg.threads // distributed.world_size()) if multi else cfg.threads)
    steps_per_epoch = -(-n_train // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = LoopState()
    latest = _latest(work)
    if latest is not None:
        model, opt, state = _restore(latest, cfg, persistence)
        ctx.log(f"resuming after epoch {state.epoch} (step {state.step}) from {latest}")
    step_module = ddp.wrap(model, compute_loss) if multi else None

    while state.epoch < cfg.epochs and state.stale_epochs < cfg.patience:
        model.train()
        order = epoch_order(n_train, cfg.seed, state.epoch)[: steps_per_epoch * cfg.batch_size]
        losses = []
        with ctx.progress() as bar:
            task = bar.add_task(f"epoch {state.epoch + 1}/{cfg.epochs}", total=steps_per_epoch)
            for batch in batches(order):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(state.step, total, warmup, cfg.decay)
                losses.append(_step(model, step_module or compute_loss, batch, opt, cfg.grad_clip))
                state.step += 1
                if hooks is not None:
                    with torch.no_grad():
                        hooks.after_step(model, state.step)
                bar.update(task, advance=1, description=f"epoch {state.epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
                if not ctx.console.is_terminal and len(losses) % max(1, steps_per_epoch // 10) == 0:
                    # No live bar in a log file: a line every tenth of an epoch instead.
                    ctx.log(
                        f"epoch {state.epoch + 1}: step {len(losses)}/{steps_per_epoch}, loss {np.mean(losses):.4f}"
                    )
        model.eval()
        with torch.no_grad():
            scores = evaluation.run(model)
        _close_epoch(state, scores, float(np.mean(losses)), evaluation=evaluation, hooks=hooks, ctx=ctx)
        if distributed.is_main():
            _save(work, model, opt, state, persistence)
        distributed.barrier()  # every rank sees the checkpoint before going on (resume, best model)
    if state.stale_epochs >= cfg.patience and state.epoch < cfg.epochs:
        ctx.log(f"early stop: {evaluation.name} did not improve for {cfg.patience} epochs")
    best = persistence.load(work / f"epoch-{state.best_epoch:03d}")
    distributed.barrier()  # rank 0 may delete the work folder once every rank has read the best model
    return best, state


def _step(model: Any, loss_of: Any, batch: Batch, opt: torch.optim.Optimizer, clip: float) -> float:
    """One optimizer step; returns the batch loss. `loss_of` is loss_fn, or the DDP module under torchrun."""
    opt.zero_grad(set_to_none=True)
    if isinstance(loss_of, torch.nn.Module):  # this rank's share of the global batch; DDP averages gradients
        part, weight = ddp.shard(batch)
        loss = loss_of(part, weight)
        loss.backward()
        loss = ddp.mean(loss.detach())
    else:
        loss = loss_of(model, batch)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.item())


def _close_epoch(
    state: LoopState,
    scores: dict[str, Any],
    train_loss: float,
    *,
    evaluation: Evaluation,
    hooks: StepHooks | None,
    ctx: Context,
) -> None:
    """Record an epoch's scores; track the best eligible epoch and the epochs without improvement."""
    metric = scores[evaluation.name]
    state.epoch += 1
    state.history.append({"epoch": state.epoch, "train_loss": train_loss, **scores})
    eligible = hooks is None or hooks.eligible(state.step)
    improved = eligible and (
        state.best_metric is None
        or (metric > state.best_metric if evaluation.higher_is_better else metric < state.best_metric)
    )
    if improved:
        state.best_metric, state.best_epoch, state.stale_epochs = metric, state.epoch, 0
    elif eligible:
        state.stale_epochs += 1
    else:
        state.history[-1]["eligible"] = False
        ctx.log(f"epoch {state.epoch} is not eligible as the best (the pruning ramp has not ended)")
    ctx.log(f"epoch {state.epoch}: train loss {train_loss:.4f}, {evaluation.name} {metric:.4f}")


def _save(work: Path, model: Any, opt: torch.optim.Optimizer, state: LoopState, persistence: Persistence) -> None:
    from safetensors.torch import save_file

    final = work / f"epoch-{state.epoch:03d}"
    tmp = work / f".epoch-{state.epoch:03d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    persistence.save(model, tmp)
    moments, groups = _flatten_optimizer(opt)
    save_file(moments, str(tmp / "optimizer.safetensors"))
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    write_atomic(tmp / "state.json", json.dumps({"loop": asdict(state), "param_groups": groups}).encode())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # Keep the newest checkpoint (to resume) and the best (the result); drop the rest.
    for old in work.glob("epoch-*"):
        if old.name not in (final.name, f"epoch-{state.best_epoch:03d}"):
            shutil.rmtree(old)


def _latest(work: Path) -> Path | None:
    done = sorted(p for p in work.glob("epoch-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _restore(
    folder: Path, cfg: TrainingSettings, persistence: Persistence
) -> tuple[Any, torch.optim.Optimizer, LoopState]:
    from safetensors.torch import load_file

    model = persistence.load(folder)
    saved = json.loads((folder / "state.json").read_text())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), saved["param_groups"]))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return model, opt, LoopState(**saved["loop"])


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    moments = {f"{idx}.{name}": t.contiguous() for idx, per in sd["state"].items() for name, t in per.items()}
    return moments, sd["param_groups"]


def _unflatten_optimizer(moments: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in moments.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = tensor
    return {"state": state, "param_groups": groups}

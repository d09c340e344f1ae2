"""One training step and the state it mutates; usable on one process without Ray, and under DDP unchanged.

`TrainState` gathers what a checkpoint must hold (model, optimizer, EMA, counters), each with
`state_dict()` / `load_state_dict()` in the torchtitan manner; `train_step` is forward, loss, backward,
non-finite check, optional clipping, optimizer, EMA: nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import Config
from pipeline.models import build_model
from pipeline.train.ema import ModelEma, unwrap
from pipeline.train.loss import compute_loss
from pipeline.train.optim import build_optimizer
from pipeline.train.schedule import StepDecaySchedule, build_schedule

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; the message names the step so the run can be inspected."""


@dataclass
class TrainState:
    model: nn.Module  # possibly DDP- or compile-wrapped; `unwrap` gives the plain module
    optimizer: torch.optim.Optimizer
    schedule: StepDecaySchedule
    ema: ModelEma | None
    step: int = 0
    samples_seen: int = 0  # global samples, across all ranks: drives the schedule
    skipped_nonfinite: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "counters": {"step": self.step, "samples_seen": self.samples_seen,
                         "skipped_nonfinite": self.skipped_nonfinite},
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        counters = state["counters"]
        self.step, self.samples_seen = counters["step"], counters["samples_seen"]
        self.skipped_nonfinite = counters.get("skipped_nonfinite", 0)


def build_train_state(config: Config, device: torch.device | str = "cpu",
                      samples_per_epoch: int | None = None) -> TrainState:
    """Model (on `device`, channels_last if configured), optimizer, schedule and EMA from the config."""
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, config.train.ema_decay, config.train.ema_warmup) if config.train.ema_decay else None
    return TrainState(model=model, optimizer=build_optimizer(model, config),
                      schedule=build_schedule(config, samples_per_epoch), ema=ema)


@dataclass(frozen=True)
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    skipped: bool


def autocast(config: Config, device: torch.device):
    """bf16 autocast on CPU or CUDA when `train.precision=bf16`; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16")


def train_step(state: TrainState, config: Config, images: torch.Tensor, targets: torch.Tensor,
               global_batch_size: int | None = None) -> StepResult:
    """One optimizer step on a (per-rank) batch; `global_batch_size` advances the sample counter (default: this batch).

    With `train.micro_batches` = m the batch is processed as m equal chunks whose gradients accumulate (BN
    statistics are then per chunk, as they are per rank under DDP).

    Under DDP the gradients are all-reduced in backward, so the non-finite decision (made on the gradient norm)
    is the same on every rank and no rank is left waiting.
    """
    model, optimizer = state.model, state.optimizer
    lr = state.schedule(state.samples_seen)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    optimizer.zero_grad(set_to_none=True)
    micro = config.train.micro_batches
    loss_value = 0.0
    for index, (x, y) in enumerate(zip(images.chunk(micro), targets.chunk(micro), strict=True)):
        # Under DDP only the last micro-batch all-reduces; the others accumulate locally.
        sync = index == micro - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(config, images.device):
            loss = compute_loss(config.loss, model(x), y) / micro
        loss.backward()
        loss_value += float(loss.detach())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if config.optimizer.grad_clip_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
    # Decided on the all-reduced gradient norm, identical on every rank (a NaN loss anywhere makes it NaN).
    finite = math.isfinite(grad_norm)
    state.step += 1
    state.samples_seen += global_batch_size or images.shape[0]
    if not finite:
        what = f"step {state.step}: loss={loss_value}, grad_norm={grad_norm} (lr={lr:.3g})"
        if config.train.nonfinite == "error":
            raise NonFiniteError(f"non-finite loss or gradients at {what}; set train.nonfinite=skip to skip such "
                                 "steps, or lower optimizer.lr / enable optimizer.grad_clip_norm")
        state.skipped_nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
        log.warning("skipped non-finite %s (%d skipped so far)", what, state.skipped_nonfinite)
        return StepResult(loss_value, lr, grad_norm, skipped=True)
    optimizer.step()
    if state.ema is not None:
        state.ema.update(model)
    return StepResult(loss_value, lr, grad_norm, skipped=False)

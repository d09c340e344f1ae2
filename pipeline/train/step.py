"""One training step and the state it mutates; usable on one process without Ray, and under DDP unchanged.

`TrainState` gathers what a checkpoint must hold (model, optimizer, EMA, counters), each with
`state_dict()` / `load_state_dict()` in the torchtitan manner; `train_step` is forward, loss, backward,
non-finite check, optional clipping, optimizer, EMA: nothing else. The fine-tuning settings act here too: the
backbone's learning rate (`optimizer.backbone_lr_multiplier`), a frozen backbone for the first
`train.freeze_backbone_steps` (its gradients dropped, its BatchNorms in eval mode) and `train.freeze_batchnorm`.

A skipped non-finite step (`train.nonfinite=skip`) leaves no trace: the forward pass updates BatchNorm's running
statistics by itself (to NaN, on a bad batch), so the step snapshots the module's buffers first and puts them back
when it skips; the optimizer and the EMA are not touched.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import Config
from pipeline.config.batching import micro_batch_count
from pipeline.models import build_model
from pipeline.train.ema import ModelEma, unwrap
from pipeline.train.loss import compute_loss, frequency_weights, loss_mask
from pipeline.train.optim import backbone_groups, build_optimizer, group_lr
from pipeline.train.schedule import LearningRateSchedule, build_schedule

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; the message (and `step`) name the step so the run can be inspected.

    Deterministic: a restart from the last checkpoint fails the same way, so launchers must not retry it.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # keeps `step` through pickling (Ray ships exceptions between processes)
        return type(self), (str(self), self.step)


@dataclass
class TrainState:
    model: nn.Module  # possibly DDP- or compile-wrapped; `unwrap` gives the plain module
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    ema: ModelEma | None
    step: int = 0
    samples_seen: int = 0  # global samples, across all ranks: drives the schedule
    skipped_nonfinite: int = 0
    extra: dict = field(default_factory=dict)
    class_weights: torch.Tensor | None = None  # the loss's per-class weights (loss.class_frequency_power); derived
    # from the training data's frequencies, so not checkpointed

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
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(self.optimizer.param_groups):
            raise ValueError(f"the checkpoint's optimizer has {saved_groups} parameter groups, this config's "
                             f"{len(self.optimizer.param_groups)}: optimizer.backbone_lr_multiplier != 1 or "
                             "train.freeze_backbone_steps > 0 give the backbone groups of its own; resume with the "
                             "settings the run started with")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        counters = state["counters"]
        self.step, self.samples_seen = counters["step"], counters["samples_seen"]
        self.skipped_nonfinite = counters.get("skipped_nonfinite", 0)


def build_train_state(config: Config, device: torch.device | str = "cpu", samples_per_epoch: int | None = None,
                      train_frequency: torch.Tensor | None = None) -> TrainState:
    """Model (on `device`, channels_last if configured), optimizer, schedule, EMA and the loss's class weights
    from the config; `train_frequency` (C,), the training set's class frequencies, is needed only by
    `loss.class_frequency_power`."""
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, config.train.ema_decay, config.train.ema_warmup) if config.train.ema_decay else None
    class_weights = None
    if config.loss.class_frequency_power:
        if train_frequency is None or train_frequency.shape != (config.model.num_classes,):
            raise ValueError(f"loss.class_frequency_power={config.loss.class_frequency_power} needs the training "
                             f"set's frequencies of all {config.model.num_classes} classes (its classes.tsv)")
        class_weights = frequency_weights(train_frequency, config.loss.class_frequency_power).to(device)
    return TrainState(model=model, optimizer=build_optimizer(model, config),
                      schedule=build_schedule(config, samples_per_epoch), ema=ema, class_weights=class_weights)


@dataclass(frozen=True)
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    skipped: bool
    ignored: int = 0  # this rank's images left out of the loss: padding, and for softmax unlabeled images


def autocast(config: Config, device: torch.device):
    """bf16 autocast on CPU or CUDA when `train.precision=bf16`; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16")


def train_step(state: TrainState, config: Config, images: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor | None = None, global_batch_size: int | None = None) -> StepResult:
    """One optimizer step on a (per-rank) batch; `global_batch_size` advances the sample counter (default: this batch).

    `valid` (B,) bool marks the images that count (`Batch.valid`; default: all); the loss is their mean
    (`pipeline.train.loss`). The batch is processed as m equal chunks whose gradients accumulate, m being
    `train.micro_batches`, or the fewest chunks within `train.max_micro_batch_size` (`pipeline.config.batching`);
    BN statistics are then per chunk, as they are per rank under DDP.

    Under DDP the gradients are all-reduced in backward, so the non-finite decision (made on the gradient norm)
    is the same on every rank and no rank is left waiting.
    """
    model, optimizer = state.model, state.optimizer
    lr, frozen = _begin_step(state, config)
    micro = micro_batch_count(images.shape[0], config.train.micro_batches, config.train.max_micro_batch_size)
    mask = loss_mask(config.loss, targets, valid)
    counted = int(mask.sum())
    # The forward pass moves BN running statistics by itself: a step that may be skipped can put them back.
    buffers = _snapshot_buffers(model) if config.train.nonfinite == "skip" else None
    loss_value = 0.0
    chunks = zip(images.chunk(micro), targets.chunk(micro), mask.chunk(micro), strict=True)
    for index, (x, y, m) in enumerate(chunks):
        # Under DDP only the last micro-batch all-reduces; the others accumulate locally.
        sync = index == micro - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(config, images.device):
            loss = compute_loss(config.loss, model(x), y, m, denominator=max(counted, 1),
                                class_weights=state.class_weights)
        loss.backward()
        loss_value += float(loss.detach())
    if frozen:
        _drop_backbone_gradients(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if config.optimizer.grad_clip_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
    # Decided on the all-reduced gradient norm, identical on every rank (a NaN loss anywhere makes it NaN).
    finite = math.isfinite(grad_norm)
    state.step += 1
    state.samples_seen += global_batch_size or images.shape[0]
    ignored = images.shape[0] - counted
    if not finite:
        what = f"step {state.step}: loss={loss_value}, grad_norm={grad_norm} (lr={lr:.3g})"
        if config.train.nonfinite == "error":
            raise NonFiniteError(f"non-finite loss or gradients at {what}; set train.nonfinite=skip to skip such "
                                 "steps, or lower optimizer.lr / enable optimizer.grad_clip_norm", step=state.step)
        if buffers is not None:
            _restore_buffers(model, buffers)
        state.skipped_nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
        log.warning("skipped non-finite %s (%d skipped so far)", what, state.skipped_nonfinite)
        return StepResult(loss_value, lr, grad_norm, skipped=True, ignored=ignored)
    optimizer.step()
    if state.ema is not None:
        state.ema.update(model)
    return StepResult(loss_value, lr, grad_norm, skipped=False, ignored=ignored)


def _begin_step(state: TrainState, config: Config) -> tuple[float, bool]:
    """Set each group's learning rate and the modules' modes, clear the gradients; (scheduled lr, backbone frozen)."""
    lr = state.schedule(state.samples_seen)
    for group in state.optimizer.param_groups:
        group["lr"] = group_lr(group, lr, config)
    frozen = state.step < config.train.freeze_backbone_steps
    set_train_modes(state.model, frozen_batchnorm=config.train.freeze_batchnorm or frozen)
    state.optimizer.zero_grad(set_to_none=True)
    return lr, frozen


def _drop_backbone_gradients(optimizer: torch.optim.Optimizer) -> None:
    """A frozen backbone: its gradients are dropped (the optimizer skips parameters without one, so neither the
    weights nor the optimizer's state move); dropped after the all-reduce, identically on every rank."""
    for group in backbone_groups(optimizer):
        for param in group["params"]:
            param.grad = None


def set_train_modes(model: nn.Module, frozen_batchnorm: bool) -> None:
    """Training mode, with every BatchNorm in eval mode when `frozen_batchnorm` (`train.freeze_batchnorm`, and
    while the backbone is frozen): it normalises with its running statistics and does not update them."""
    model.train()
    if frozen_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the module's buffers (BN running statistics and counters: small next to the weights)."""
    return [buffer.detach().clone() for buffer in unwrap(model).buffers()]


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for buffer, value in zip(unwrap(model).buffers(), saved, strict=True):
        buffer.copy_(value)

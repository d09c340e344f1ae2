"""Polyak averaging of the weights (the paper evaluates with it), kept in fp32 whatever the training precision.

shadow <- d * shadow + (1 - d) * weight after every optimizer step, for parameters and floating-point buffers
(BN running statistics), with d = min(decay, (1 + n) / (10 + n)) when warm-up is on (TensorFlow's
`ExponentialMovingAverage(num_updates=n)`), so early evaluations are not dominated by the random init.
Integer buffers (BN's num_batches_tracked) are copied.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class ModelEma:
    """An fp32 shadow copy of a model's state, updated in place; owns no module, only tensors."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            name: t.detach().clone().float() if t.is_floating_point() else t.detach().clone()
            for name, t in unwrap(model).state_dict().items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, value in unwrap(model).state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().float(), 1.0 - d)  # shadow + (1-d)(value - shadow)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

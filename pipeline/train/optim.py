"""Optimizers as the paper ran them: TensorFlow's RMSprop (JFT) and SGD with momentum (ImageNet), with L2.

PyTorch's `torch.optim.RMSprop` is not the paper's optimizer: it adds epsilon outside the square root (1e-8 by
default) and starts the mean square at zero, so early steps divide by ~|g| and are huge. TensorFlow's
`RMSPropOptimizer` (Inception V3 recipe: decay 0.9, momentum 0.9, epsilon 1.0) does, per parameter p with
gradient g:

    ms  <- decay * ms + (1 - decay) * g^2          (ms starts at 1, not 0)
    mom <- momentum * mom + lr * g / sqrt(ms + epsilon)
    p   <- p - mom

Note lr sits inside the momentum buffer, as in TF. No library ships this in a form we can depend on (timm's
`RMSpropTF` is the public reference; timm is not a dependency), so it is written here, and tests check it
against the update rule written out in numpy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config import Config
from pipeline.models.xception import is_head
from pipeline.train.ema import unwrap


class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow-semantics RMSprop with momentum (see module docstring). Weight decay is L2 added to the gradient."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.001,
        decay: float = 0.9,
        momentum: float = 0.9,
        epsilon: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not 0.0 < decay < 1.0 or not 0.0 <= momentum < 1.0 or epsilon <= 0 or weight_decay < 0:
            raise ValueError(
                f"RMSpropTF: need lr >= 0, 0 < decay < 1, 0 <= momentum < 1, epsilon > 0, weight_decay >= 0; got "
                f"lr={lr}, decay={decay}, momentum={momentum}, epsilon={epsilon}, weight_decay={weight_decay}"
            )
        defaults = {"lr": lr, "decay": decay, "momentum": momentum, "epsilon": epsilon, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["decay"], group["momentum"]
            epsilon, weight_decay = group["epsilon"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if weight_decay:
                    grad = grad.add(p.float(), alpha=weight_decay)
                state = self.state[p]
                if not state:
                    state["mean_square"] = torch.ones_like(p, dtype=torch.float32)  # TF initialises ms to 1
                    state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
                mean_square, mom = state["mean_square"], state["momentum"]
                mean_square.mul_(decay).addcmul_(grad, grad, value=1.0 - decay)
                # out of place: for fp32 parameters `grad` is `p.grad` itself, which callers may still read
                update = grad / mean_square.add(epsilon).sqrt_()
                if momentum > 0:
                    mom.mul_(momentum).add_(update, alpha=lr)
                    p.sub_(mom.to(p.dtype))
                else:
                    p.sub_(update.mul_(lr).to(p.dtype))
        return loss


def param_groups(model: nn.Module, weight_decay: float, split_backbone: bool = False) -> list[dict]:
    """L2 on conv and dense kernels only; BN scales/offsets and biases are not decayed (as in TF-slim Inception).

    Each group's "part" says whose parameters it holds: "all", or with `split_backbone` (fine-tuning) "backbone"
    and "head" (`pipeline.models.xception.is_head`), so that each step can set the backbone's learning rate
    (`group_lr`) and freeze it (`backbone_groups`)."""
    parts = ("backbone", "head") if split_backbone else ("all",)
    groups = {(part, decayed): [] for part in parts for decayed in (True, False)}
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            part = ("head" if is_head(name) else "backbone") if split_backbone else "all"
            groups[part, param.ndim > 1].append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "part": part}
            for (part, decayed), params in groups.items()]


def needs_backbone_groups(config: Config) -> bool:
    """Whether the fine-tuning settings treat the backbone apart from the head."""
    return config.optimizer.backbone_lr_multiplier != 1.0 or config.train.freeze_backbone_steps > 0


def group_lr(group: dict, lr: float, config: Config) -> float:
    """The learning rate of one parameter group at a step whose scheduled rate is `lr` (read from the config at
    every step, so a resumed run follows the config it resumes with)."""
    return lr * config.optimizer.backbone_lr_multiplier if group.get("part") == "backbone" else lr


def backbone_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [group for group in optimizer.param_groups if group.get("part") == "backbone"]


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optimizer named by `config.optimizer`, at the batch-scaled base learning rate."""
    opt = config.optimizer
    groups = param_groups(model, opt.weight_decay, split_backbone=needs_backbone_groups(config))
    if opt.name == "rmsprop_tf":
        return RMSpropTF(groups, lr=config.scaled_lr, decay=opt.rmsprop_decay, momentum=opt.momentum,
                         epsilon=opt.epsilon)
    # SGD: torch's weight_decay is exactly L2 added to the gradient, and torch's momentum update
    # (buf = m * buf + g; p -= lr * buf) is TF's MomentumOptimizer (accum = m * accum + g; p -= lr * accum).
    return torch.optim.SGD(groups, lr=config.scaled_lr, momentum=opt.momentum)

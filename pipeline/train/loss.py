"""Losses: per-class sigmoid cross-entropy for multi-label data (JFT), softmax cross-entropy for one label (ImageNet).

Targets are dense multi-hot (B, C) float tensors built on the device from sparse label lists
(`pipeline.data.to_device`). Reduction for the sigmoid loss is a documented choice (the paper is silent):

- `sum_classes_mean_batch` (default): sum the C binary terms of an image, then average over images. Gradients per
  logit do not shrink as C grows, which matters with TF-RMSprop's epsilon of 1.0 (tiny gradients would be
  scaled down by sqrt(epsilon) rather than normalised).
- `mean`: average over all B x C terms (TF's `sigmoid_cross_entropy` default, Keras `binary_crossentropy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig


def sigmoid_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum_classes_mean_batch",
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy of every class, computed in fp32 from logits (numerically stable)."""
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    per_term = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    if reduction == "sum_classes_mean_batch":
        return per_term.sum(dim=1).mean()
    if reduction == "mean":
        return per_term.mean()
    raise ValueError(f"loss.reduction={reduction!r}: must be 'sum_classes_mean_batch' or 'mean'")


def softmax_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against the target distribution (one-hot, or multi-hot normalised to sum to 1)."""
    targets = targets.float()
    counts = targets.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("softmax loss: an image has no label; the softmax preset needs exactly one label per image")
    return F.cross_entropy(logits.float(), targets / counts, label_smoothing=label_smoothing)


def compute_loss(config: LossConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.shape != targets.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if config.name == "sigmoid":
        return sigmoid_loss(logits, targets, config.reduction, config.label_smoothing)
    return softmax_loss(logits, targets, config.label_smoothing)

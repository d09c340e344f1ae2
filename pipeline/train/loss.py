"""Losses: per-class sigmoid cross-entropy for multi-label data (JFT), softmax cross-entropy for one label (ImageNet).

Targets are dense multi-hot (B, C) float tensors built on the device from sparse label lists
(`pipeline.data.to_device`). Reduction for the sigmoid loss is a documented choice (the paper is silent):

- `sum_classes_mean_batch` (default): sum the C binary terms of an image, then average over images. Gradients per
  logit do not shrink as C grows, which matters with TF-RMSprop's epsilon of 1.0 (tiny gradients would be
  scaled down by sqrt(epsilon) rather than normalised).
- `mean`: average over all B x C terms (TF's `sigmoid_cross_entropy` default, Keras `binary_crossentropy`).

Training averages over the images that count (`loss_mask`): loader padding (`Batch.valid` False) never does, and
for the softmax loss neither does an image without a label (there is no target distribution to match; such rows
are counted by the caller instead of crashing the run). An image without labels is an ordinary all-negative
example for the sigmoid loss. A batch in which nothing counts gives a zero loss that still reaches every
parameter, so backward produces (zero) gradients and DDP's all-reduce runs on every rank. The mean is per rank
(DDP then averages the ranks), so a rank's remaining images weigh a little more when it has padding; in training
that happens only for a loader slot without one good sample. Padding still passes through BatchNorm's batch
statistics in the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig


def sigmoid_loss_per_image(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum_classes_mean_batch",
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) binary cross-entropy of every class, summed (or averaged, `mean`) per image; fp32 from the logits."""
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    per_term = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    if reduction == "sum_classes_mean_batch":
        return per_term.sum(dim=1)
    if reduction == "mean":
        return per_term.mean(dim=1)
    raise ValueError(f"loss.reduction={reduction!r}: must be 'sum_classes_mean_batch' or 'mean'")


def softmax_loss_per_image(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) cross-entropy against the target distribution (one-hot, or multi-hot normalised to sum to 1).

    A row without labels gets an all-zero target (a finite value with finite gradients); mask it out.
    """
    targets = targets.float()
    distribution = targets / targets.sum(dim=1, keepdim=True).clamp(min=1.0)
    return F.cross_entropy(logits.float(), distribution, label_smoothing=label_smoothing, reduction="none")


def loss_mask(config: LossConfig, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the images the loss averages over (not padding; for softmax, not unlabeled)."""
    if valid is None:
        mask = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
    else:
        mask = valid.to(targets.device, torch.bool)
    if config.name == "softmax":
        mask = mask & (targets.sum(dim=1) > 0)
    return mask


def compute_loss(config: LossConfig, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
                 denominator: int | None = None) -> torch.Tensor:
    """Sum of the per-image losses of the images in `loss_mask`, divided by `denominator` (default: their number,
    at least 1). A caller splitting a batch into micro-batches passes the whole batch's count, so the chunks'
    losses add up to the batch mean."""
    if logits.shape != targets.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if config.name == "sigmoid":
        per_image = sigmoid_loss_per_image(logits, targets, config.reduction, config.label_smoothing)
    else:
        per_image = softmax_loss_per_image(logits, targets, config.label_smoothing)
    mask = loss_mask(config, targets, valid)
    if denominator is None:
        denominator = max(int(mask.sum()), 1)
    # `where`, not a product: a masked row's Inf/NaN loss must not turn the sum into NaN (0 * inf is NaN).
    return torch.where(mask, per_image, 0.0).sum() / denominator

"""Losses: per-class sigmoid cross-entropy for multi-label data (JFT), softmax cross-entropy for one label (ImageNet),
and the options a multi-label practitioner reaches for when labels are missing and negatives dominate.

Targets are dense multi-hot (B, C) float tensors built on the device from sparse label lists
(`pipeline.data.to_device`). The multi-label losses are a sum of per-(image, class) terms
y * L+(p) + (1 - y) * w_neg * L-(p), p = sigmoid(logit), each class's terms scaled by its weight w_c:

- `sigmoid` (the paper's): L+ = -log p, L- = -log(1 - p).
- `asymmetric` (ASL, Ridnik et al., "Asymmetric Loss for Multi-Label Classification", ICCV 2021, eq. 6 with the
  probability margin of eq. 3): L+ = -(1 - p)^gamma_pos log p, L- = -p_m^gamma_neg log(1 - p_m) with
  p_m = max(p - clip, 0). Negatives the model already scores low are focused away (gamma_neg) or ignored outright
  (below the margin), so the many easy negatives, and the missing true labels among them, weigh less.
- `negative_weight` w_neg: every class not labelled on an image is a negative, and with sparse labels some are
  missing positives; weighting them down (the "weak negatives" of Cole et al., CVPR 2021) trusts them less.
- `class_frequency_power` a: w_c = (n_c + 1)^-a / mean over classes, n_c the class's training frequency, so a rare
  class's binary problem counts more (a = 1: inversely to its frequency; the +1 keeps a class absent from the
  training labels finite).

Reduction for the multi-label losses is a documented choice (the paper is silent):

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


def asymmetric_terms(logits: torch.Tensor, gamma_pos: float, gamma_neg: float,
                     clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ASL's positive and negative terms (L+, L-) of every logit (see the module docstring), computed from
    sigmoid(-x) and log-sigmoids, so they stay finite where p rounds to 0 or 1."""
    positive = -F.logsigmoid(logits)
    if gamma_pos:
        positive = positive * torch.sigmoid(-logits).pow(gamma_pos)
    if clip:
        one_minus = (torch.sigmoid(-logits) + clip).clamp(max=1.0)  # 1 - p_m, at least clip: its log is finite
        negative = -torch.log(one_minus)
        shifted = 1.0 - one_minus  # p_m
    else:
        negative = -F.logsigmoid(-logits)
        shifted = torch.sigmoid(logits)
    if gamma_neg:
        negative = negative * shifted.pow(gamma_neg)
    return positive, negative


def multi_label_terms(config: LossConfig, logits: torch.Tensor, targets: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) loss terms of the sigmoid or asymmetric loss, negatives times `negative_weight`, each class's column
    times `class_weights` (C,) when given; fp32 from the logits."""
    targets = targets.float()
    if config.label_smoothing:
        targets = targets * (1.0 - config.label_smoothing) + 0.5 * config.label_smoothing
    logits = logits.float()
    if config.name == "sigmoid" and config.negative_weight == 1.0 and class_weights is None:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # the paper's, as it always was
    if config.name == "asymmetric":
        positive, negative = asymmetric_terms(logits, config.gamma_pos, config.gamma_neg, config.clip)
    else:
        positive, negative = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    terms = targets * positive + (1.0 - targets) * config.negative_weight * negative
    return terms if class_weights is None else terms * class_weights.to(terms.device, terms.dtype)


def reduce_classes(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-image loss from (B, C) terms: their sum (`sum_classes_mean_batch`) or mean (`mean`)."""
    if reduction == "sum_classes_mean_batch":
        return terms.sum(dim=1)
    if reduction == "mean":
        return terms.mean(dim=1)
    raise ValueError(f"loss.reduction={reduction!r}: must be 'sum_classes_mean_batch' or 'mean'")


def frequency_weights(train_frequency: torch.Tensor, power: float) -> torch.Tensor:
    """(C,) float32 class weights (n_c + 1)^-power normalised to a mean of 1 (`loss.class_frequency_power`)."""
    weights = (train_frequency.double() + 1.0).pow(-power)
    return (weights / weights.mean()).float()


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
                 denominator: int | None = None, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the per-image losses of the images in `loss_mask`, divided by `denominator` (default: their number,
    at least 1). A caller splitting a batch into micro-batches passes the whole batch's count, so the chunks'
    losses add up to the batch mean. `class_weights` (C,): `frequency_weights` (multi-label losses only)."""
    if logits.shape != targets.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if config.activation == "sigmoid":
        per_image = reduce_classes(multi_label_terms(config, logits, targets, class_weights), config.reduction)
    else:
        per_image = softmax_loss_per_image(logits, targets, config.label_smoothing)
    mask = loss_mask(config, targets, valid)
    if denominator is None:
        denominator = max(int(mask.sum()), 1)
    # `where`, not a product: a masked row's Inf/NaN loss must not turn the sum into NaN (0 * inf is NaN).
    return torch.where(mask, per_image, 0.0).sum() / denominator

"""The multi-label loss options against hand computations and an independent float64 re-implementation of ASL.

ASL's reference below is written from the paper's formulas (Ridnik et al., ICCV 2021, eqs. 3 and 6) in NumPy,
with p computed as 1 / (1 + e^-x) and nothing shared with `pipeline.train.loss`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import LossConfig, load_config
from pipeline.train.loss import compute_loss, frequency_weights
from pipeline.train.step import build_train_state, train_step

LOGITS = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _p(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def asl_reference(logits: np.ndarray, targets: np.ndarray, gamma_pos: float, gamma_neg: float,
                  clip: float) -> np.ndarray:
    """(B,) ASL summed over classes, straight from the paper: L+ = (1-p)^g+ log p, L- = p_m^g- log(1-p_m)."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    p_m = np.maximum(p - clip, 0.0)
    loss_pos = (1 - p) ** gamma_pos * np.log(p)
    loss_neg = p_m ** gamma_neg * np.log(1 - p_m)
    return -(targets * loss_pos + (1 - targets) * loss_neg).sum(axis=1)


def test_asymmetric_loss_by_hand():
    config = LossConfig(name="asymmetric", gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
    # image 0: class 0 positive at x=0, class 1 negative at x=2; image 1: negative at x=-1, positive at x=0.5
    pos0 = -(1 - _p(0.0)) * math.log(_p(0.0))  # (1 - 0.5)^1 * -log 0.5
    m1 = _p(2.0) - 0.05
    neg1 = -(m1 ** 4) * math.log(1 - m1)
    m2 = _p(-1.0) - 0.05
    neg2 = -(m2 ** 4) * math.log(1 - m2)
    pos3 = -(1 - _p(0.5)) * math.log(_p(0.5))
    expected = (pos0 + neg1 + neg2 + pos3) / 2
    assert math.isclose(compute_loss(config, LOGITS, TARGETS).item(), expected, rel_tol=1e-6)
    # the paper's defaults (gamma_pos 0): a positive term is plain cross-entropy
    plain_pos = LossConfig(name="asymmetric", gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    bce = LossConfig(name="sigmoid")
    assert math.isclose(compute_loss(plain_pos, LOGITS, TARGETS).item(), compute_loss(bce, LOGITS, TARGETS).item(),
                        rel_tol=1e-6)


@pytest.mark.parametrize(("gamma_pos", "gamma_neg", "clip"), [(0.0, 4.0, 0.05), (1.0, 4.0, 0.05), (0.0, 2.0, 0.0),
                                                              (2.0, 1.0, 0.2)])
def test_asymmetric_loss_matches_an_independent_reimplementation(gamma_pos, gamma_neg, clip):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 40, generator=g) * 4
    targets = (torch.rand(16, 40, generator=g) < 0.2).float()
    config = LossConfig(name="asymmetric", gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    expected = asl_reference(logits.numpy(), targets.numpy(), gamma_pos, gamma_neg, clip)
    np.testing.assert_allclose(compute_loss(config, logits, targets).item(), expected.mean(), rtol=1e-5)
    mean = LossConfig(name="asymmetric", gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, reduction="mean")
    np.testing.assert_allclose(compute_loss(mean, logits, targets).item(), expected.mean() / 40, rtol=1e-5)


def test_asymmetric_loss_ignores_easy_negatives_and_stays_finite_at_extreme_logits():
    config = LossConfig(name="asymmetric")  # the paper's gamma_neg 4, gamma_pos 0, clip 0.05
    logits = torch.tensor([[-4.0, -2.0, 3.0, 60.0, -60.0]], requires_grad=True)  # p = 0.018, 0.12, 0.95, 1, 0
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    loss = compute_loss(config, logits, targets)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(logits.grad).all())
    assert logits.grad[0, 0] == 0.0  # p below the margin: the negative adds nothing
    assert 0 < logits.grad[0, 1] < logits.grad[0, 2]  # harder negatives pull harder
    assert logits.grad[0, 4] < 0  # the missed positive pulls its logit up
    # a negative at p = 1 costs at most (1 - clip)^4 * -log(clip); the missed positive at x = -60 costs 60
    assert math.isclose(loss.item(), -(0.95 ** 4) * math.log(0.05) + 60 + math.log1p(math.exp(-60)) + _neg(-4.0)
                        + _neg(-2.0) + _neg(3.0), rel_tol=1e-5)


def _neg(x: float) -> float:
    m = max(_p(x) - 0.05, 0.0)
    return -(m ** 4) * math.log(1 - m)


def test_negative_weight_scales_only_the_unlabelled_classes():
    config = LossConfig(negative_weight=0.25)
    bce = [[-math.log(_p(0.0)), -math.log(1 - _p(2.0))], [-math.log(1 - _p(-1.0)), -math.log(_p(0.5))]]
    expected = (bce[0][0] + 0.25 * bce[0][1] + 0.25 * bce[1][0] + bce[1][1]) / 2
    assert math.isclose(compute_loss(config, LOGITS, TARGETS).item(), expected, rel_tol=1e-6)
    asl = LossConfig(name="asymmetric", negative_weight=0.25, gamma_neg=0.0, clip=0.0)
    assert math.isclose(compute_loss(asl, LOGITS, TARGETS).item(), expected, rel_tol=1e-6)


def test_class_frequency_weights_by_hand():
    weights = frequency_weights(torch.tensor([9.0, 0.0]), 1.0)  # (10^-1, 1^-1) = (0.1, 1), mean 0.55
    assert torch.allclose(weights, torch.tensor([0.1 / 0.55, 1 / 0.55]))
    assert torch.allclose(frequency_weights(torch.tensor([3.0, 99.0]), 0.5), torch.tensor([0.5 / 0.3, 0.1 / 0.3]))
    assert torch.equal(frequency_weights(torch.tensor([5.0, 7.0]), 0.0), torch.ones(2))
    bce = [[-math.log(_p(0.0)), -math.log(1 - _p(2.0))], [-math.log(1 - _p(-1.0)), -math.log(_p(0.5))]]
    w0, w1 = 0.1 / 0.55, 1 / 0.55
    expected = (w0 * bce[0][0] + w1 * bce[0][1] + w0 * bce[1][0] + w1 * bce[1][1]) / 2
    assert math.isclose(compute_loss(LossConfig(class_frequency_power=1.0), LOGITS, TARGETS, class_weights=weights)
                        .item(), expected, rel_tol=1e-6)


def test_loss_options_in_the_config():
    config = load_config("demo", ["loss.name=asymmetric"])
    assert config.loss.activation == "sigmoid" and math.isclose(config.head_bias, -math.log(config.model.num_classes))
    assert load_config("imagenet_xception").loss.activation == "softmax"
    for option in ("loss.negative_weight=0.5", "loss.class_frequency_power=0.5"):
        with pytest.raises(ValueError, match="apply to the multi-label losses"):
            load_config("demo", ["loss.name=softmax", option])
    for paper in ("jft_xception", "jft_xception_fc"):  # the paper's presets keep the paper's loss
        loss = load_config(paper).loss
        assert (loss.name, loss.negative_weight, loss.class_frequency_power) == ("sigmoid", 1.0, 0.0)


TINY = ["model.width_multiplier=0.125", "model.middle_blocks=1", "model.num_classes=3", "data.image_size=71",
        "train.global_batch_size=4", "train.precision=fp32", "loss.class_frequency_power=1.0"]


def test_class_frequency_weights_reach_the_training_step():
    config = load_config("demo", TINY)
    with pytest.raises(ValueError, match="needs the training set's frequencies of all 3 classes"):
        build_train_state(config)
    state = build_train_state(config, train_frequency=torch.tensor([99.0, 9.0, 0.0]))
    assert torch.allclose(state.class_weights, frequency_weights(torch.tensor([99.0, 9.0, 0.0]), 1.0))
    images = torch.zeros(4, 3, 71, 71)
    targets = torch.tensor([[1.0, 0, 0]] * 4)
    with torch.no_grad():
        logits = state.model.train()(images)
    expected = compute_loss(config.loss, logits, targets, class_weights=state.class_weights).item()
    unweighted = compute_loss(config.loss, logits, targets).item()
    result = train_step(state, config, images, targets)
    assert math.isclose(result.loss, expected, rel_tol=1e-5) and not math.isclose(result.loss, unweighted,
                                                                                    rel_tol=1e-3)

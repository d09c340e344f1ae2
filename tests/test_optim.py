"""Optimizer, schedule, EMA and loss against independent references written out here in numpy / by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import LossConfig, ScheduleConfig
from pipeline.train.ema import ModelEma
from pipeline.train.loss import compute_loss
from pipeline.train.optim import RMSpropTF, param_groups
from pipeline.train.schedule import LearningRateSchedule


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_rmsprop_tf_leaves_gradients_untouched(momentum):
    # callers (gradient-norm logging, clipping checks, DDP buckets) may read p.grad after the step
    param = nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    RMSpropTF([param], lr=0.1, momentum=momentum).step()
    assert torch.equal(param.grad, torch.full((4,), 2.0))
    assert not torch.equal(param.detach(), torch.ones(4))


def tf_rmsprop_reference(p0, grads, lrs, decay, momentum, eps, wd):
    """TensorFlow's RMSPropOptimizer update (training_ops ApplyRMSProp / ApplyMomentum) in numpy, float64."""
    p = p0.astype(np.float64).copy()
    ms = np.ones_like(p)
    mom = np.zeros_like(p)
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        g = g + wd * p
        ms = ms + (1 - decay) * (g * g - ms)
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        p = p - mom
        out.append(p.copy())
    return out


@pytest.mark.parametrize(("momentum", "eps", "wd"), [(0.9, 1.0, 1e-5), (0.0, 1e-3, 0.0), (0.5, 0.1, 0.01)])
def test_rmsprop_tf_matches_numpy_reference_step_by_step(momentum, eps, wd):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3))
    grads = [rng.normal(scale=s, size=p0.shape) for s in (1.0, 10.0, 0.01, 3.0, 1.0, 0.5)]
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01, 0.2]  # lr changes mid-run: TF keeps lr inside the momentum buffer
    param = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = RMSpropTF([param], lr=lrs[0], decay=0.9, momentum=momentum, epsilon=eps, weight_decay=wd)
    expected = tf_rmsprop_reference(p0, grads, lrs, 0.9, momentum, eps, wd)
    for g, lr, want in zip(grads, lrs, expected, strict=True):
        opt.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        np.testing.assert_allclose(param.detach().numpy(), want, rtol=1e-6, atol=1e-7)


def test_rmsprop_tf_first_step_is_small_unlike_torch_rmsprop():
    """Why the TF variant exists: ms starts at 1 and eps sits inside sqrt, so step 1 is ~lr*g, not ~lr/sqrt(0.1)."""
    g = torch.full((4,), 1e-3)
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    tf_opt = RMSpropTF([a], lr=0.01, momentum=0.9, epsilon=1.0)
    pt_opt = torch.optim.RMSprop([b], lr=0.01, alpha=0.9, momentum=0.9)
    a.grad, b.grad = g.clone(), g.clone()
    tf_opt.step()
    pt_opt.step()
    assert a.abs().max() < 1e-4 < b.abs().max()


def test_weight_decay_skips_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    decay, no_decay = param_groups(model, 1e-5)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_rmsprop_tf_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="epsilon=0"):
        RMSpropTF([nn.Parameter(torch.zeros(1))], epsilon=0)


def test_step_decay_in_samples_and_epochs():
    jft = LearningRateSchedule(ScheduleConfig(decay_rate=0.9, decay_every=3_000_000, unit="samples"), base_lr=0.001)
    assert jft(0) == 0.001
    assert jft(2_999_999) == 0.001
    assert math.isclose(jft(3_000_000), 0.0009)
    assert math.isclose(jft(10_000_000), 0.001 * 0.9**3)
    imagenet = LearningRateSchedule(ScheduleConfig(decay_rate=0.94, decay_every=2, unit="epochs"), base_lr=0.045,
                                 samples_per_epoch=1_281_167)
    assert imagenet(2 * 1_281_167 - 1) == 0.045
    assert math.isclose(imagenet(2 * 1_281_167), 0.045 * 0.94)
    assert math.isclose(imagenet(7 * 1_281_167), 0.045 * 0.94**3)
    with pytest.raises(ValueError, match="needs the epoch length"):
        LearningRateSchedule(ScheduleConfig(unit="epochs"), base_lr=0.1)


def test_warmup_and_constant():
    warm = LearningRateSchedule(ScheduleConfig(name="constant", warmup_samples=1000), base_lr=0.2)
    assert warm(0) == 0.0 and math.isclose(warm(250), 0.05) and warm(1000) == 0.2 and warm(10**9) == 0.2


def test_ema_update_arithmetic():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEma(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)  # 0.9 * 1.2 + 0 = 1.08
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.08))


def test_ema_warmup_buffers_fp32_and_state_round_trip():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).to(torch.bfloat16)
    ema = ModelEma(model, decay=0.9999, warmup=True)
    assert all(t.dtype == torch.float32 for n, t in ema.shadow.items() if "num_batches" not in n)
    assert math.isclose(ema.current_decay(), 0.1)  # (1 + 0) / (10 + 0)
    model.train()
    model(torch.randn(8, 2, dtype=torch.bfloat16))  # moves BN running stats and num_batches_tracked
    ema.update(model)
    assert ema.shadow["1.num_batches_tracked"].item() == 1
    expected_mean = 0.1 * 0.0 + 0.9 * model[1].running_mean.float()
    assert torch.allclose(ema.shadow["1.running_mean"], expected_mean)
    other = ModelEma(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
    target = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    target.load_state_dict(ema.state_dict()["shadow"])  # as the evaluator loads a checkpoint's EMA weights
    assert torch.equal(target[0].weight, ema.shadow["0.weight"])


def test_sigmoid_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    terms = [[bce(0.0, 1), bce(2.0, 0)], [bce(-1.0, 0), bce(0.5, 1)]]
    per_image = [sum(row) for row in terms]
    summed, mean = LossConfig(), LossConfig(reduction="mean")
    assert math.isclose(compute_loss(summed, logits, targets).item(), sum(per_image) / 2, rel_tol=1e-6)
    assert math.isclose(compute_loss(mean, logits, targets).item(), sum(per_image) / 4, rel_tol=1e-6)


def test_softmax_loss_and_shape_check():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    softmax = LossConfig(name="softmax")
    assert math.isclose(compute_loss(softmax, logits, torch.tensor([[1.0, 0, 0]])).item(), expected, rel_tol=1e-6)
    # an image without a label has no target distribution: left out of the mean (training counts it as ignored)
    both = torch.cat([logits, logits])
    assert math.isclose(compute_loss(softmax, both, torch.tensor([[1.0, 0, 0], [0, 0, 0]])).item(), expected,
                        rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"logits \(1, 3\) and targets \(1, 2\)"):
        compute_loss(LossConfig(), logits, torch.zeros(1, 2))


def test_cosine_follows_the_planned_run_and_takes_a_warmup():
    cosine = LearningRateSchedule(ScheduleConfig(name="cosine"), base_lr=0.01, total_samples=32_000)
    assert cosine(0) == 0.01
    assert math.isclose(cosine(16_000), 0.005)
    assert math.isclose(cosine(8_000), 0.01 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(32_000) == 0.0 and cosine(64_000) == 0.0  # past the plan (a raised total_steps re-plans)
    floored = LearningRateSchedule(ScheduleConfig(name="cosine", final_fraction=0.1, warmup_samples=1000),
                                   base_lr=0.01, total_samples=32_000)
    assert math.isclose(floored(500), 0.5 * 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 500 / 32_000))))
    assert math.isclose(floored(32_000), 0.001)
    with pytest.raises(ValueError, match="planned samples"):
        LearningRateSchedule(ScheduleConfig(name="cosine"), base_lr=0.1)

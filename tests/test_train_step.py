"""The single-process training step: it learns, it honours precision/layout options, and it refuses NaNs."""

import io
import math

import pytest
import torch

from pipeline.config import LossConfig, load_config
from pipeline.models import count_parameters
from pipeline.train.loss import compute_loss
from pipeline.train.step import NonFiniteError, build_train_state, train_step

TINY = ["model.width_multiplier=0.125", "model.middle_blocks=1", "model.num_classes=12", "data.image_size=71",
        "train.global_batch_size=8", "train.ema_decay=0.9"]


def fixed_batch(num_classes=12, batch=8, size=71, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    targets = (torch.rand(batch, num_classes, generator=g) < 0.25).float()
    targets[:, 0] = 1.0  # at least one label per image
    return images, targets


@pytest.mark.parametrize("fc", [[], [32, 32]])
def test_tiny_model_overfits_a_fixed_multilabel_batch(fc):
    config = load_config("demo", [*TINY, f"model.fc_layers={fc}", "optimizer.lr=0.01"])
    state = build_train_state(config)
    images, targets = fixed_batch()
    losses = [train_step(state, config, images, targets).loss for _ in range(60)]
    assert losses[-1] < losses[0] / 10, losses[::10]
    assert state.step == 60 and state.samples_seen == 60 * 8
    # EMA moved away from the initial weights towards the trained ones
    name = next(n for n, p in state.model.named_parameters() if p.ndim > 1)
    init = build_train_state(config).model.state_dict()[name]
    assert not torch.equal(state.ema.shadow[name], init)


def test_fc_layers_change_the_model():
    plain = build_train_state(load_config("demo", TINY)).model
    with_fc = build_train_state(load_config("demo", [*TINY, "model.fc_layers=[32, 32]"])).model
    assert count_parameters(with_fc) > count_parameters(plain)


def test_head_bias_prior_is_applied():
    config = load_config("demo", TINY)
    model = build_train_state(config).model
    logits = model.eval()(torch.zeros(1, 3, 71, 71))
    # near-zero features at init: logits sit near the -log(C) prior
    assert abs(logits.mean().item() - config.head_bias) < 1.0


@pytest.mark.parametrize("option", ["train.precision=fp32", "train.precision=bf16", "train.channels_last=false",
                                    "train.channels_last=true", "optimizer.name=sgd", "optimizer.grad_clip_norm=0.5",
                                    "model.checkpoint_middle_flow=true"])
def test_step_options_train(option):
    config = load_config("demo", [*TINY, option, "optimizer.lr=0.01"])
    state = build_train_state(config)
    kernel = next(p for p in state.model.parameters() if p.ndim == 4 and p.shape[-1] > 1)  # a 3x3 conv kernel
    assert kernel.is_contiguous(memory_format=torch.channels_last) == config.train.channels_last
    images, targets = fixed_batch()
    first = train_step(state, config, images, targets)
    for _ in range(14):
        last = train_step(state, config, images, targets)
    assert last.loss < first.loss
    if option == "optimizer.grad_clip_norm=0.5":
        total = torch.nn.utils.get_total_norm([p.grad for p in state.model.parameters() if p.grad is not None])
        assert total <= 0.5 + 1e-4


def test_nonfinite_loss_raises_naming_the_step_or_is_skipped():
    config = load_config("demo", TINY)
    state = build_train_state(config)
    images, targets = fixed_batch()
    train_step(state, config, images, targets)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="at step 2"):
        train_step(state, config, bad, targets)

    config = load_config("demo", [*TINY, "train.nonfinite=skip"])
    state = build_train_state(config)
    train_step(state, config, images, targets)  # BN statistics and EMA away from their initial values
    before = {n: t.detach().clone() for n, t in state.model.state_dict().items()}  # parameters and BN buffers
    shadow = {n: t.clone() for n, t in state.ema.shadow.items()}
    ema_updates = state.ema.num_updates
    result = train_step(state, config, bad, targets)
    assert result.skipped and state.skipped_nonfinite == 1
    # The forward pass on the bad batch moved BN's running statistics to NaN: the skipped step puts them back.
    assert all(torch.equal(before[n], t) for n, t in state.model.state_dict().items())
    assert state.ema.num_updates == ema_updates and all(torch.equal(shadow[n], t) for n, t in state.ema.shadow.items())
    with torch.no_grad():
        assert torch.isfinite(state.model.eval()(images)).all()
    assert not train_step(state, config, images, targets).skipped
    assert all(torch.isfinite(t).all() for t in state.ema.shadow.values() if t.is_floating_point())


def test_state_dict_round_trip_continues_identically():
    config = load_config("demo", TINY)
    images, targets = fixed_batch()
    a = build_train_state(config)
    for _ in range(3):
        train_step(a, config, images, targets)
    b = build_train_state(load_config("demo", [*TINY, "train.seed=7"]))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as a checkpoint does; also proves weights_only loading works
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert (b.step, b.samples_seen) == (3, 24)
    ra, rb = train_step(a, config, images, targets), train_step(b, config, images, targets)
    assert ra.loss == rb.loss
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_loss_ignores_invalid_rows_and_an_all_invalid_batch_still_backpropagates():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    targets = (torch.rand(4, 5, generator=g) < 0.4).float()
    valid = torch.tensor([True, False, True, False])
    for config in (LossConfig(), LossConfig(reduction="mean")):
        masked = compute_loss(config, logits, targets, valid)
        assert masked.item() == pytest.approx(compute_loss(config, logits[valid], targets[valid]).item(), rel=1e-6)
        (grad,) = torch.autograd.grad(masked, logits)
        assert not grad[~valid].any() and grad[valid].abs().sum() > 0
    # Nothing valid: zero loss, zero gradients, and the graph still reaches the logits (DDP's all-reduce runs).
    empty = compute_loss(LossConfig(), logits, targets, torch.zeros(4, dtype=torch.bool))
    (grad,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and not grad.any()
    # Softmax: an image without a label does not count (no crash), whatever its logits.
    softmax = LossConfig(name="softmax")
    onehot = torch.eye(5)[[0, 3, 1, 2]]
    onehot[1] = 0.0
    loss = compute_loss(softmax, logits, onehot)
    assert loss.item() == pytest.approx(compute_loss(softmax, logits[[0, 2, 3]], onehot[[0, 2, 3]]).item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_padding_rows_do_not_train(loss):
    """Padding (valid=False) contributes nothing: its labels are irrelevant, and it is counted as ignored."""
    config = load_config("demo", [*TINY, f"loss.name={loss}", "train.micro_batches=2"])
    images, targets = fixed_batch()
    valid = torch.tensor([True, True, True, False, True, False, True, True])
    runs = []
    for seed in (1, 2):  # two different labelings of the padding rows
        labels = targets.clone()
        labels[~valid] = (torch.rand(2, 12, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
        state = build_train_state(config)
        result = train_step(state, config, images, labels, valid)
        runs.append((result, {n: p.detach().clone() for n, p in state.model.named_parameters()}))
    (first, params), (second, other) = runs
    assert first.ignored == 2 and first.loss == second.loss
    assert all(torch.equal(params[n], other[n]) for n in params)
    # An image without labels: ignored (and counted) by the softmax loss, an all-negative example for the sigmoid one.
    unlabeled = targets.clone()
    unlabeled[2] = 0.0
    result = train_step(build_train_state(config), config, images, unlabeled, valid)
    assert result.ignored == (3 if loss == "softmax" else 2) and math.isfinite(result.loss)
    # All padding (a barren rank): zero loss, and still an optimizer step that keeps the ranks in lockstep.
    state = build_train_state(config)
    result = train_step(state, config, images, targets, torch.zeros(8, dtype=torch.bool))
    assert result.loss == 0.0 and result.ignored == 8 and not result.skipped
    assert all(p.grad is not None and not p.grad.any() for p in state.model.parameters())

"""The single-process training step: it learns, it honours precision/layout options, and it refuses NaNs."""

import io

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import count_parameters
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


@pytest.mark.parametrize("option", ["train.precision=bf16", "train.channels_last=true", "optimizer.name=sgd",
                                    "optimizer.grad_clip_norm=0.5", "model.checkpoint_middle_flow=true"])
def test_step_options_train(option):
    config = load_config("demo", [*TINY, option, "optimizer.lr=0.01"])
    state = build_train_state(config)
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
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    result = train_step(state, config, bad, targets)
    assert result.skipped and state.skipped_nonfinite == 1
    assert all(torch.equal(before[n], p) for n, p in state.model.named_parameters())
    assert not train_step(state, config, images, targets).skipped


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

"""Fine-tuning controls: the backbone's learning rate, a frozen backbone for the first steps, frozen BatchNorm
statistics, and the backbone/head rule of loading weights (`pipeline.models.weights.load_into`)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_train_step import TINY, fixed_batch

from pipeline.config import load_config
from pipeline.models import Xception
from pipeline.models.weights import load_into
from pipeline.models.xception import is_head
from pipeline.train.step import build_train_state, train_step

FP32 = [*TINY, "train.precision=fp32", "schedule.name=constant", "optimizer.lr=0.01"]


def backbone(state_dict: dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items() if not is_head(k)}


def one_step_deltas(*overrides: str) -> tuple[dict, dict]:
    """Parameter changes of one step from the same initial weights and batch: (backbone, head)."""
    config = load_config("demo", [*FP32, *overrides])
    state = build_train_state(config)
    before = {k: p.detach().clone() for k, p in state.model.named_parameters()}
    train_step(state, config, *fixed_batch())
    deltas = {k: p.detach() - before[k] for k, p in state.model.named_parameters()}
    return ({k: d for k, d in deltas.items() if not is_head(k)}, {k: d for k, d in deltas.items() if is_head(k)})


def test_backbone_lr_multiplier_scales_the_backbone_update_only():
    base_backbone, base_head = one_step_deltas()
    backbone_delta, head_delta = one_step_deltas("optimizer.backbone_lr_multiplier=0.25")
    for name, delta in base_backbone.items():  # RMSprop's first step is linear in lr
        torch.testing.assert_close(backbone_delta[name], 0.25 * delta, rtol=1e-4, atol=2e-7, msg=name)
    assert any(d.abs().max() > 0 for d in base_backbone.values())
    for name, delta in base_head.items():
        torch.testing.assert_close(head_delta[name], delta, msg=name)


def test_the_schedule_scales_both_groups():
    config = load_config("demo", [*TINY, "optimizer.backbone_lr_multiplier=0.1", "schedule.name=cosine",
                                  "train.total_steps=4"])
    state = build_train_state(config)
    assert sorted(g["part"] for g in state.optimizer.param_groups) == ["backbone", "backbone", "head", "head"]
    images, targets = fixed_batch()
    for _ in range(3):
        result = train_step(state, config, images, targets)
        lrs = {g["part"]: g["lr"] for g in state.optimizer.param_groups}
        assert lrs["head"] == result.lr and math.isclose(lrs["backbone"], 0.1 * result.lr)
    assert 0 < result.lr < config.scaled_lr  # the cosine has moved


def test_frozen_backbone_stays_exactly_as_it_was_for_n_steps():
    config = load_config("demo", [*FP32, "train.freeze_backbone_steps=2"])
    state = build_train_state(config)
    start = backbone(state.model.state_dict())  # weights and BatchNorm statistics
    head_start = state.model.classifier.weight.detach().clone()
    images, targets = fixed_batch()
    for _ in range(2):
        train_step(state, config, images, targets)
    after_two = state.model.state_dict()
    for name, value in start.items():
        assert torch.equal(after_two[name], value), name
    assert not torch.equal(state.model.classifier.weight, head_start)
    frozen = [p for g in state.optimizer.param_groups if g["part"] == "backbone" for p in g["params"]]
    assert all(not state.optimizer.state[p] for p in frozen)  # no optimizer state piles up while frozen
    train_step(state, config, images, targets)  # step 3 trains the backbone
    moved = state.model.state_dict()
    assert not torch.equal(moved["entry_flow.conv1.weight"], start["entry_flow.conv1.weight"])
    assert not torch.equal(moved["entry_flow.bn1.running_mean"], start["entry_flow.bn1.running_mean"])


@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_batchnorm_keeps_the_statistics_and_trains_scale_and_offset(frozen):
    config = load_config("demo", [*FP32, f"train.freeze_batchnorm={str(frozen).lower()}"])
    state = build_train_state(config)
    bn = state.model.entry_flow.block2.layers[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    train_step(state, config, *fixed_batch())
    assert torch.equal(bn.running_mean, before["running_mean"]) == frozen
    assert torch.equal(bn.running_var, before["running_var"]) == frozen
    assert not torch.equal(bn.weight, before["weight"]) and not torch.equal(bn.bias, before["bias"])


def test_resuming_with_other_backbone_groups_is_refused_with_the_settings_named():
    plain = build_train_state(load_config("demo", TINY))
    split = build_train_state(load_config("demo", [*TINY, "optimizer.backbone_lr_multiplier=0.5"]))
    with pytest.raises(ValueError, match="backbone_lr_multiplier"):
        split.load_state_dict(plain.state_dict())


def tiny_model(num_classes: int, **kwargs) -> Xception:
    return Xception(num_classes, width_multiplier=0.125, middle_blocks=1, **kwargs)


def test_load_into_takes_the_head_only_when_all_of_it_fits():
    torch.manual_seed(1)
    source = tiny_model(10, fc_layers=(16,)).state_dict()
    same = tiny_model(10, fc_layers=(16,))
    summary = load_into(same, source)
    assert summary.head == "loaded" and summary.fresh == [] and summary.not_used == []
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())

    torch.manual_seed(2)
    other = tiny_model(7, fc_layers=(16,), head_bias=-math.log(7))
    fresh_head = {k: v.clone() for k, v in other.state_dict().items() if is_head(k)}
    summary = load_into(other, source)
    assert summary.head.startswith("fresh") and "model.num_classes" in summary.head
    # the FC layer fits, but only the backbone is taken when the classifier does not
    assert summary.fresh == ["fc_layers.0.weight", "fc_layers.0.bias", "classifier.weight", "classifier.bias"]
    assert summary.not_used == sorted(fresh_head)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in fresh_head.items())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in source.items() if not is_head(k))
    assert summary.loaded_tensors == sum(1 for k in source if not is_head(k))


def test_load_into_names_a_mismatched_or_missing_backbone_tensor():
    source = tiny_model(10).state_dict()
    wider = Xception(10, width_multiplier=0.25, middle_blocks=1)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"'entry_flow.conv2.weight' has shape \(8, 8, 3, 3\) there, \(16, 8, 3, 3\)"):
        load_into(wider, source)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # nothing half-loaded
    del source["middle_flow.block5.layers.1.pointwise.weight"]
    with pytest.raises(ValueError, match=re.escape("middle_flow.block5.layers.1.pointwise.weight")):
        load_into(tiny_model(10), source)
    extra = {**tiny_model(10).state_dict(), "aux.weight": torch.zeros(1)}
    assert load_into(tiny_model(10), extra).unexpected == ["aux.weight"]

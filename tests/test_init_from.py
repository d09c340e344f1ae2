"""Starting a run from weights (`model.init_from`): a short run on the tiny demo's 115 classes, then a run on another
class set (20 OpenMoji classes) from it; and the timm `legacy_xception` name map."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from test_checkpoint import TINY_MODEL
from torch import nn

from pipeline.checkpoint.format import (
    MissingEmaWeights,
    checkpoint_url,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from pipeline.config import ShardsConfig, load_config
from pipeline.data.format import read_manifest
from pipeline.models import Xception
from pipeline.models.weights import (
    absolute_init_source,
    load_into,
    parse_init_source,
    read_init_weights,
    timm_to_model_name,
)
from pipeline.models.xception import is_head
from pipeline.train import loop
from pipeline.train.ema import unwrap
from pipeline.train.loop import train


@pytest.fixture(scope="module")
def openmoji_subset(tmp_path_factory) -> tuple[str, int]:
    """160 OpenMoji training images over the 60 most common emoji: 20 classes, none of them the tiny demo's."""
    from pipeline.data.demo import write_demo_shards

    root = str(tmp_path_factory.mktemp("openmoji-subset") / "train")
    options = ShardsConfig(samples_per_shard=40, workers=1, progress=False)
    write_demo_shards("openmoji", "train", 160, 0, root, image_size=80, options=options, catalog_size=60,
                      min_tag_count=3)
    return root, read_manifest(root).num_classes


def run_config(train_url, num_classes, storage, name, *extra):
    return load_config("demo", [*TINY_MODEL, f"data.train={train_url}", "data.eval=null",
                                f"model.num_classes={num_classes}", f"run.storage={storage}", f"run.name={name}",
                                "checkpoint.every_steps=2", "checkpoint.background=false", *extra])


def test_fine_tuning_from_a_run_on_another_class_set(tiny_demo, openmoji_subset, tmp_path, monkeypatch):
    first = run_config(tiny_demo.train, tiny_demo.num_classes, tmp_path, "shapes", "train.total_steps=4")
    train(first)
    source = read_checkpoint(latest_checkpoint(first.run_dir).url)["state"]
    assert source["counters"]["step"] == 4

    url, classes = openmoji_subset
    assert classes != tiny_demo.num_classes
    second = run_config(url, classes, tmp_path, "emoji", f"model.init_from={first.run_dir}", "train.total_steps=2")
    at_first_step = {}
    step = loop.train_step

    def recording_step(state, *args, **kwargs):
        if not at_first_step:
            at_first_step["model"] = {k: v.clone() for k, v in unwrap(state.model).state_dict().items()}
            at_first_step["ema"] = {k: v.clone() for k, v in state.ema.shadow.items()}
        return step(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    train(second)
    model, ema = at_first_step["model"], at_first_step["ema"]
    # The backbone is the first run's EMA weights (not its raw ones), and the EMA starts from them.
    backbone = [k for k in model if not is_head(k)]
    for name in backbone:
        assert torch.equal(model[name].float(), source["ema"]["shadow"][name]), name
        assert torch.equal(ema[name], source["ema"]["shadow"][name]), name
    assert not torch.equal(source["ema"]["shadow"]["entry_flow.conv1.weight"],
                           source["model"]["entry_flow.conv1.weight"])
    # The head is fresh: 20 classes, the -log(C) bias of a fresh sigmoid head.
    assert model["classifier.weight"].shape == (classes, Xception(1, width_multiplier=0.125).num_features)
    assert torch.allclose(model["classifier.bias"], torch.full((classes,), -math.log(classes)))

    summary = json.loads((tmp_path / "emoji" / "init_from.json").read_text())
    assert summary["source"] == {"kind": "run", "url": first.run_dir, "checkpoint": latest_checkpoint(
        first.run_dir).url, "step": 4, "weights": "ema"}
    assert summary["head"].startswith("fresh") and summary["fresh"] == ["classifier.weight", "classifier.bias"]
    assert summary["not_used"] == ["classifier.bias", "classifier.weight"] and summary["unexpected"] == []
    assert summary["loaded_tensors"] == len(backbone)

    # Resumed, the run continues from its own checkpoint and never reads the source again (it is gone).
    shutil.rmtree(first.run_dir)
    at_first_step.clear()
    resumed = run_config(url, classes, tmp_path, "emoji", f"model.init_from={first.run_dir}", "train.total_steps=3")
    assert train(resumed)["step"] == 3
    assert latest_checkpoint(second.run_dir).step == 3
    step_two = read_checkpoint(checkpoint_url(second.run_dir, 2))["state"]["model"]
    assert all(torch.equal(v, step_two[k]) for k, v in at_first_step["model"].items())  # where it resumed


def test_run_weights_raw_on_request_and_source_detection(tiny_demo, tmp_path):
    config = run_config(tiny_demo.train, tiny_demo.num_classes, tmp_path, "raw", "train.total_steps=2")
    train(config)
    checkpoint = latest_checkpoint(config.run_dir)
    saved = read_checkpoint(checkpoint.url)["state"]
    raw = read_init_weights(checkpoint.url, weights="raw")  # a checkpoint directory works as well as its run
    assert raw.source["weights"] == "raw" and raw.source["checkpoint"] == checkpoint.url
    assert all(torch.equal(v, saved["model"][k]) for k, v in raw.state.items())
    assert parse_init_source("keras:/w/any-name").kind == "keras"
    assert parse_init_source("/w/xception_weights_tf_dim_ordering_tf_kernels_notop.h5").kind == "keras"
    assert parse_init_source("s3://b/legacy_xception.safetensors").kind == "timm"
    assert parse_init_source("s3://b/runs/mine").kind == "run"
    assert absolute_init_source("weights.pth") == f"timm:{os.path.abspath('weights.pth')}"
    with pytest.raises(FileNotFoundError, match="no COMMIT"):
        read_init_weights(str(tmp_path / "nothing-here"))
    # A run that kept no EMA: its EMA weights are refused (pipeline.checkpoint's one policy), its raw ones load.
    plain = run_config(tiny_demo.train, tiny_demo.num_classes, tmp_path, "plain", "train.ema_decay=null")
    write_checkpoint(plain.run_dir, 1, {**saved, "ema": None}, plain)
    with pytest.raises(MissingEmaWeights, match=r"has no EMA weights .*model.init_weights=raw"):
        read_init_weights(plain.run_dir)
    assert read_init_weights(plain.run_dir, weights="raw").source["weights"] == "raw"


class _Separable(nn.Module):  # the timm layout written out: depthwise `conv1`, then `pointwise`
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)


def _timm_block(cin: int, cout: int, reps: int, first_relu: bool, pool: bool) -> nn.Module:
    block = nn.Module()
    layers: list[nn.Module] = []
    widths = [cout] * reps if cin != cout and reps == 2 and cin != 728 else [cin] * (reps - 1) + [cout]
    chs = cin
    for out in widths:
        layers += [nn.ReLU(), _Separable(chs, out), nn.BatchNorm2d(out)]
        chs = out
    block.rep = nn.Sequential(*(layers if first_relu else layers[1:]), *([nn.MaxPool2d(3, 2, 1)] if pool else []))
    if pool:
        block.skip, block.skipbn = nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout)
    return block


def timm_layout_state(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """Random tensors under timm `legacy_xception`'s keys: conv1/bn1, conv2/bn2, block1-12 (rep.I, skip, skipbn),
    conv3/bn3, conv4/bn4, fc; from a module tree with that layout, not from the name map under test."""
    torch.manual_seed(0)
    net = nn.Module()
    net.conv1, net.bn1 = nn.Conv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32)
    net.conv2, net.bn2 = nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64)
    specs = [(64, 128, 2, False, True), (128, 256, 2, True, True), (256, 728, 2, True, True),
             *[(728, 728, 3, True, False)] * 8, (728, 1024, 2, True, True)]
    for index, spec in enumerate(specs, start=1):
        setattr(net, f"block{index}", _timm_block(*spec))
    net.conv3, net.bn3 = _Separable(1024, 1536), nn.BatchNorm2d(1536)
    net.conv4, net.bn4 = _Separable(1536, 2048), nn.BatchNorm2d(2048)
    net.fc = nn.Linear(2048, num_classes)
    state = net.state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("wrapped", [False, True])
def test_timm_legacy_xception_state_dict_loads_every_tensor(tmp_path, wrapped):
    timm_state = timm_layout_state()
    path = tmp_path / "legacy_xception.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_state.items()}} if wrapped else timm_state, path)
    weights = read_init_weights(str(path))
    model = Xception(1000)
    summary = load_into(model, weights.state, weights.source)
    assert summary.head == "loaded" and summary.unexpected == [] and summary.fresh == []
    assert summary.loaded_tensors == len(timm_state)  # every timm tensor has exactly one place
    ours = model.state_dict()
    assert torch.equal(ours["middle_flow.block5.layers.4.depthwise.weight"], timm_state["block4.rep.4.conv1.weight"])
    assert torch.equal(ours["exit_flow.block13.shortcut.1.running_var"], timm_state["block12.skipbn.running_var"])
    assert torch.equal(ours["entry_flow.block2.layers.3.pointwise.weight"], timm_state["block1.rep.3.pointwise.weight"])
    assert torch.equal(ours["exit_flow.conv4.depthwise.weight"], timm_state["conv4.conv1.weight"])
    assert torch.equal(ours["classifier.bias"], timm_state["fc.bias"])
    assert timm_to_model_name("head.fc.weight") is None


def test_prepare_makes_the_source_absolute_and_refuses_a_missing_one(tiny_demo, tmp_path, monkeypatch):
    from pipeline.train.launcher import prepare

    monkeypatch.chdir(tmp_path)
    config = run_config(tiny_demo.train, tiny_demo.num_classes, "runs", "first", "train.total_steps=2")
    train(config)
    ready = prepare(run_config(tiny_demo.train, tiny_demo.num_classes, "runs", "second", "model.init_from=runs/first"))
    assert ready.model.init_from == f"run:{tmp_path / 'runs' / 'first'}"
    with pytest.raises(FileNotFoundError, match="no such keras weights file"):
        prepare(run_config(tiny_demo.train, tiny_demo.num_classes, "runs", "third", "model.init_from=missing.h5"))
    # a run that has its own checkpoint resumes from it: the source is not needed any more
    prepare(run_config(tiny_demo.train, tiny_demo.num_classes, "runs", "first", "model.init_from=missing.h5"))

"""Configuration: presets load, overrides apply, and every kind of bad input is refused with the key named."""

import math

import pytest

from pipeline.config import ConfigError, config_to_yaml, describe_options, load_config, preset_names, validate
from pipeline.config.loading import apply_overrides, read_preset_or_file


def test_presets_ship_and_load():
    assert {"demo", "jft_xception", "jft_xception_fc", "imagenet_xception"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_jft_preset_matches_paper():
    c = load_config("jft_xception")
    assert c.optimizer.name == "rmsprop_tf" and c.optimizer.momentum == 0.9 and c.optimizer.lr == 0.001
    assert c.optimizer.weight_decay == 1e-5 and c.model.dropout == 0.0 and c.loss.name == "sigmoid"
    assert c.schedule.decay_rate == 0.9 and c.schedule.decay_every == 3_000_000 and c.schedule.unit == "samples"
    assert c.train.ema_decay is not None and c.model.fc_layers == [] and c.eval.k == 100
    assert math.isclose(c.head_bias, -math.log(17000))
    assert load_config("jft_xception_fc").model.fc_layers == [4096, 4096]


def test_imagenet_preset_matches_paper():
    c = load_config("imagenet_xception")
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.momentum) == ("sgd", 0.045, 0.9)
    assert (c.schedule.decay_rate, c.schedule.decay_every, c.schedule.unit) == (0.94, 2, "epochs")
    assert c.model.dropout == 0.5 and c.loss.name == "softmax" and c.head_bias == 0.0


def test_overrides_parse_yaml_values():
    c = load_config("demo", ["model.fc_layers=[64, 32]", "train.ema_decay=null", "optimizer.lr=0.5",
                             "data.train=s3://bucket/train", "train.precision=bf16"])
    assert c.model.fc_layers == [64, 32] and c.train.ema_decay is None and c.optimizer.lr == 0.5
    assert c.data.train == "s3://bucket/train" and c.train.precision == "bf16"


def test_yaml_1_2_floats_are_numbers(tmp_path):
    # PyYAML alone reads 1e-5 as a string, which the strict schema would refuse
    c = load_config("demo", ["optimizer.weight_decay=1e-5", "optimizer.epsilon=1E+0"])
    assert c.optimizer.weight_decay == 1e-5 and c.optimizer.epsilon == 1.0
    path = tmp_path / "mine.yaml"
    path.write_text("optimizer:\n  weight_decay: 2e-5\n  lr: 1\n")
    c = load_config(str(path))
    assert c.optimizer.weight_decay == 2e-5 and c.optimizer.lr == 1.0
    # a string setting takes an override's text as written
    c = load_config("demo", ["run.name=2024", "data.train=1e5", "data.eval=null"])
    assert (c.run.name, c.data.train, c.data.eval) == ("2024", "1e5", None)


@pytest.mark.parametrize(("preset", "overrides"), [("jft_xception_fc", ["optimizer.lr_scaling=sqrt"]),
                                                  ("demo", ["loss.name=softmax"]), ("imagenet_xception", [])])
def test_round_trip_through_yaml(tmp_path, preset, overrides):
    c = load_config(preset, overrides)
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(c))
    assert load_config(str(path)) == c  # checkpoints, Ray workers and the evaluator all re-validate saved configs
    assert validate(c.model_dump(mode="json")) == c


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.nope=1"], "unknown config key 'model.nope'; allowed in this section: name, num_classes"),
        (["nosuch.key=1"], "unknown config section 'nosuch'; allowed here: model, data"),
        (["model.num_classes=many"], "config key 'model.num_classes' = 'many': Input should be a valid integer"),
        (["optimizer.name=adam"], "config key 'optimizer.name' = 'adam': must be one of 'rmsprop_tf' or 'sgd'"),
        (["model.dropout=1.5"], "config key 'model.dropout' = 1.5"),
        (["train.global_batch_size=0"], "config key 'train.global_batch_size' = 0"),
        (["train.global_batch_size=33", "cluster.num_workers=2"], "must be divisible by cluster.num_workers=2"),
        (["data.augment.min_area=0.9", "data.augment.max_area=0.5"], "min_area=0.9 must be <= max_area=0.5"),
        (["run.name=../escape"], "config key 'run.name'"),
        (["cluster.use_gpu=true", "cluster.gpus_per_worker=0"], "needs cluster.gpus_per_worker > 0"),
        (["cluster.collective_timeout_s=120"], "cluster.collective_timeout_s=120 must exceed storage.outage_budget_s"),
        (["model.num_classes"], "is not of the form key.sub=value"),
        # wrong types are refused, not coerced
        (['train.total_steps="10"'], "config key 'train.total_steps' = '10': Input should be a valid integer"),
        (["train.total_steps=10.5"], "config key 'train.total_steps' = 10.5: Input should be a valid integer"),
        (["model.checkpoint_middle_flow=1"], "config key 'model.checkpoint_middle_flow' = 1: Input should be a valid"),
        (["model.head_bias=low"], "config key 'model.head_bias' = 'low': Input should be a valid number; or must be"),
        # impossible combinations
        (["loss.name=softmax", "loss.reduction=sum_classes_mean_batch"], "applies to the multi-label losses only"),
        (["eval.class_weights=train_freq"],
         "config key 'eval.class_weights' = 'train_freq': must be one of 'uniform', 'train_frequency' or "
         "'classes_file'"),
        (["eval.class_weights=s3://b/weights.csv"], "'s3://b/weights.csv': must be one of 'uniform'"),
        (["eval.resources={evaluator: 0}"], "config key 'eval.resources.evaluator' = 0: Input should be greater"),
        (["model.fc_layers=[64, -1]"], "config key 'model.fc_layers.1' = -1: Input should be greater"),
    ],
)
def test_bad_overrides_are_refused_with_the_key_named(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    assert expected in str(info.value)


def test_bad_yaml_files(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  num_clases: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.num_clases'"):
        load_config(str(unknown))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(scalar))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_all_problems_reported_at_once():
    raw = apply_overrides(read_preset_or_file("demo"), ["optimizer.momentum=2", "eval.k=0"])
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert "optimizer.momentum" in str(info.value) and "eval.k" in str(info.value)


def test_lr_scaling_and_help():
    c = load_config("demo", ["train.global_batch_size=128", "optimizer.reference_batch_size=32",
                             "optimizer.lr_scaling=sqrt", "optimizer.lr=0.001"])
    assert math.isclose(c.scaled_lr, 0.001 * 2)
    c = load_config("demo", ["train.global_batch_size=128", "optimizer.reference_batch_size=32",
                             "optimizer.lr_scaling=linear", "optimizer.lr=0.001"])
    assert math.isclose(c.scaled_lr, 0.001 * 4)
    lines = describe_options()
    assert any(line.startswith("optimizer.epsilon = 1.0") for line in lines)
    assert any(line.startswith("data.augment.min_area = 0.08") for line in lines)


def test_shards_section_holds_the_shard_writer_defaults():
    shards = load_config("demo").shards
    assert (shards.max_shard_mb, shards.max_image_side, shards.jpeg_quality) == (256.0, 512, 90)
    assert shards.max_shard_bytes == 256 * 2**20 and shards.workers is None and shards.progress
    c = load_config("demo", ["shards.max_shard_mb=0.0625", "shards.samples_per_shard=40", "shards.workers=1"])
    assert (c.shards.max_shard_bytes, c.shards.samples_per_shard, c.shards.workers) == (64 * 1024, 40, 1)
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["shards.max_shard_mb=0.01", "shards.jpeg_quality=101", "shards.max_image_side=8"])
    assert all(f"shards.{key}" in str(err.value) for key in ("max_shard_mb", "jpeg_quality", "max_image_side"))

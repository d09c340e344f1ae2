"""The model must learn: a short real training run must beat the scorers that never look at the image.

The whole path runs: shards of learnable built-in data (the demo preset's 100 emoji and their shared classes, at
a smaller size, evaluated on the training artist's drawings), the streaming loader with its augmentation, the
preset's optimizer and schedule, the training loop, the evaluator with EMA weights. Label misalignment, an
augmentation that destroys the signal or an optimizer that cannot move all leave a model near the class prior, and
fail here. Seeds are fixed; nothing is timed.
"""

from __future__ import annotations

import pytest

from pipeline.checkpoint.format import latest_checkpoint
from pipeline.config import ShardsConfig, load_config
from pipeline.data.demo import write_demo_shards
from pipeline.data.format import read_classes, read_manifest
from pipeline.evaluation.evaluator import evaluate_checkpoint
from pipeline.train.loop import train

pytestmark = pytest.mark.slow  # minutes of training on the CPU

# The demo preset's model, batch and optimizer at 96 px: 300 steps, about a minute per run on 2 cores. Not smaller:
# at 72 px (2026-12-06, AMD) the preset gave 2.67x the prior per class / +8.7 points per image and the control
# 1.71x / +1.6, so with the Intel CPUs' 5.5 points less per image (below) no per-image bar would keep room on both.
SMALL = ["data.image_size=96", "data.demo=null", "data.loader_workers=1", "train.total_steps=300",
         "train.log_every=50", "checkpoint.every_steps=300", "checkpoint.background=false", "eval.batch_size=100"]
DEMO = {"catalog_size": 100, "min_tag_count": 3}  # the demo preset's data: 100 emoji, ~34 shared classes
PAPER_STYLE = ["optimizer.epsilon=1.0", "data.augment.random_resized_crop=true", "data.augment.min_area=0.08",
               "data.augment.eval_crop_fraction=0.875"]


@pytest.fixture(scope="module")
def emoji(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    """Demo shards: 1,200 training images (sparse labels), 200 evaluation images (dense labels, same artist)."""
    root = tmp_path_factory.mktemp("learnable-emoji")
    options = ShardsConfig(samples_per_shard=80, workers=1, progress=False)
    train_prefix, eval_prefix = f"{root}/train", f"{root}/eval"
    write_demo_shards("openmoji", "train", 1200, 0, train_prefix, image_size=112, options=options, **DEMO)
    manifest = read_manifest(train_prefix)
    write_demo_shards("openmoji", "eval", 200, 1, eval_prefix, image_size=112, options=options,
                      vocabulary=read_classes(train_prefix, manifest), eval_artist="same", **DEMO)
    return train_prefix, eval_prefix, manifest.num_classes


def train_and_evaluate(data: tuple[str, str, int], tmp_path, overrides: list[str]) -> tuple[dict, dict]:
    train_prefix, eval_prefix, num_classes = data
    config = load_config("demo", [*SMALL, f"data.train={train_prefix}", f"data.eval={eval_prefix}",
                                  f"model.num_classes={num_classes}", f"run.storage={tmp_path}", *overrides])
    train(config)
    evaluation = evaluate_checkpoint(latest_checkpoint(config.run_dir).url, config)
    return evaluation.result.scalars(), evaluation.baselines


# Measured on 2 cores, per class / per image: the demo preset 29.0% / 65.7% (3.3x the prior's 8.7%, 11.9 points
# above its 53.8%) on an AMD EPYC (2026-12-01), 25.8% / 60.2% (3.0x, +6.4) on an Intel Xeon with AMX (2026-12-06;
# the same code gives that on both commits tried: bf16 kernels differ between the CPUs, and CI gets either); the
# demo preset as it was before (lr 0.005, epsilon 1.0, step decay, Inception crops) 20.7% / 58.4% (2.4x, +4.6);
# the paper-style control below 15.1% / 54.9% (1.7x, +1.1). The bars sit between the control and the lower of the
# two machines.
TIMES_PRIOR, POINTS_ABOVE_PRIOR = 2.8, 0.05


def test_demo_settings_learn_far_beyond_the_class_prior(emoji, tmp_path):
    scores, baselines = train_and_evaluate(emoji, tmp_path, [])
    prior, random = baselines["prior"], baselines["random"]
    assert prior["image_map@100"] > 2 * random["image_map@100"]  # the prior is a real bar per image
    assert scores["map@100"] >= TIMES_PRIOR * prior["map@100"], (scores, baselines)
    assert scores["image_map@100"] >= prior["image_map@100"] + POINTS_ABOVE_PRIOR, (scores, baselines)


def test_paper_style_settings_do_not_learn_in_a_short_run(emoji, tmp_path):
    """The control: epsilon 1.0 (RMSprop degenerates to SGD at lr x g) and Inception crops down to 8% of the image
    stay near the prior on the same data and budget; this is what the test above guards against."""
    scores, baselines = train_and_evaluate(emoji, tmp_path, PAPER_STYLE)
    prior = baselines["prior"]
    assert scores["map@100"] < TIMES_PRIOR * prior["map@100"], (scores, baselines)
    assert scores["image_map@100"] < prior["image_map@100"] + POINTS_ABOVE_PRIOR, (scores, baselines)

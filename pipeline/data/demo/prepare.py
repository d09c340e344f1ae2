"""Make the demo dataset exist (generate it once into `data.demo.location`) and point a config at it.

The location is keyed by everything that changes the bytes (variant, sizes, seed), so changing a setting never
reuses a stale dataset, and a finished one is found again by its manifest (the writer publishes it last).
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Config, validate
from pipeline.data.manifest import MANIFEST_FILE, read_classes, read_manifest
from pipeline.data.shards import ShardOptions, write_demo_shards
from pipeline.storage import exists, join_url

log = logging.getLogger(__name__)


def demo_prefix(config: Config) -> str:
    demo = config.data.demo
    assert demo is not None
    base = os.path.expanduser(demo.location) if "://" not in demo.location else demo.location
    name = f"{demo.variant}-{demo.image_size}px-seed{demo.seed}-{demo.train_images}-{demo.eval_images}"
    return join_url(base, name)


def prepare_demo_data(config: Config, workers: int | None = None) -> Config:
    """A copy of `config` whose data.train / data.eval / model.num_classes point at the (generated) demo data."""
    demo = config.data.demo
    if demo is None:
        raise ValueError("data.demo is not set: nothing to prepare (set data.train to your own shards instead)")
    prefix, storage = demo_prefix(config), config.storage
    train, evaluation = join_url(prefix, "train"), join_url(prefix, "eval")
    options = ShardOptions(samples_per_shard=demo.images_per_shard, workers=workers)
    if not exists(join_url(train, MANIFEST_FILE), storage):
        log.info("generating the %s demo training set (%d images) into %s", demo.variant, demo.train_images, train)
        write_demo_shards(demo.variant, "train", demo.train_images, demo.seed, train, image_size=demo.image_size,
                          options=options, storage=storage)
    manifest = read_manifest(train, storage)
    if not exists(join_url(evaluation, MANIFEST_FILE), storage):
        log.info("generating the %s demo evaluation set (%d images) into %s", demo.variant, demo.eval_images,
                 evaluation)
        write_demo_shards(demo.variant, "eval", demo.eval_images, demo.seed + 1, evaluation,
                          vocabulary=read_classes(train, manifest, storage), image_size=demo.image_size,
                          options=options, storage=storage)
    raw = config.model_dump(mode="json")
    raw["data"].update(train=train, eval=evaluation)
    raw["model"]["num_classes"] = manifest.num_classes
    return validate(raw)

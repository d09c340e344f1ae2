"""Make the demo dataset exist (generate it once into `data.demo.location`) and point a config at it.

The location is keyed by everything that changes the bytes (variant, sizes, seed), so changing a setting never
reuses a stale dataset, and a finished one is found again by its manifest (the writer publishes it last).
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Config, ShardsConfig, validate
from pipeline.data.demo.shards import write_demo_shards
from pipeline.data.manifest import MANIFEST_FILE, read_classes, read_manifest
from pipeline.storage import exists, is_local_url, join_url

log = logging.getLogger(__name__)


EVAL_SETS = {"same": "eval", "second": "eval-second-artist"}  # eval_artist -> directory beside "train"


def demo_prefix(config: Config) -> str:
    demo = config.data.demo
    assert demo is not None
    base = os.path.expanduser(demo.location) if is_local_url(demo.location) else demo.location
    # "v2": since eval/ holds the in-domain set (it held the second artist's before), old caches are not reused
    name = f"v2-{demo.variant}-{demo.image_size}px-seed{demo.seed}-{demo.train_images}-{demo.eval_images}"
    if demo.variant == "openmoji" and (demo.catalog_size is not None or demo.min_tag_count != 5):
        name += f"-catalog{demo.catalog_size or 'all'}-min{demo.min_tag_count}"
    return join_url(base, name)


def _variant_options(config: Config) -> dict:
    demo = config.data.demo
    assert demo is not None
    if demo.variant != "openmoji":
        return {}
    return {"catalog_size": demo.catalog_size, "min_tag_count": demo.min_tag_count}


def prepare_demo_data(config: Config, workers: int | None = None) -> Config:
    """A copy of `config` whose data.train / data.eval / model.num_classes point at the (generated) demo data.

    Two evaluation sets are written beside the training set, of the same scenes (same seed): objects drawn by the
    training artist (`eval`, in-domain) and by a second artist (`eval-second-artist`); `data.demo.eval_artist`
    picks the one `data.eval` points at."""
    demo = config.data.demo
    if demo is None:
        raise ValueError("data.demo is not set: nothing to prepare (set data.train to your own shards instead)")
    prefix, storage = demo_prefix(config), config.storage
    train = join_url(prefix, "train")
    options = ShardsConfig(samples_per_shard=demo.images_per_shard, workers=workers)
    variant_options = _variant_options(config)
    if not exists(join_url(train, MANIFEST_FILE), storage):
        log.info("generating the %s demo training set (%d images) into %s", demo.variant, demo.train_images, train)
        write_demo_shards(demo.variant, "train", demo.train_images, demo.seed, train, image_size=demo.image_size,
                          options=options, storage=storage, **variant_options)
    manifest = read_manifest(train, storage)
    for artist, name in EVAL_SETS.items():
        evaluation = join_url(prefix, name)
        if not exists(join_url(evaluation, MANIFEST_FILE), storage):
            log.info("generating the %s demo evaluation set (%d images, %s artist) into %s", demo.variant,
                     demo.eval_images, artist, evaluation)
            write_demo_shards(demo.variant, "eval", demo.eval_images, demo.seed + 1, evaluation,
                              vocabulary=read_classes(train, manifest, storage), image_size=demo.image_size,
                              options=options, storage=storage, eval_artist=artist, **variant_options)
    raw = config.model_dump(mode="json")
    raw["data"].update(train=train, eval=join_url(prefix, EVAL_SETS[demo.eval_artist]))
    raw["model"]["num_classes"] = manifest.num_classes
    return validate(raw)

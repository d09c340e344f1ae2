"""Scene composition shared by every demo variant: objects with known labels pasted onto a background.

A variant supplies a catalog (classes, object types with their dense labels and a long-tailed sampling weight),
one artist per split (how an object type is drawn) and a background source. This module turns those into
`DemoSample`s: a deterministic function of (seed, split, index), so generation parallelises and resumes anywhere.

Label policy (the JFT / FastEval14k contrast):

- eval ("dense", FastEval14k-like): the union of all labels of all placed objects. Every placed object stays at least
  `min_visible` visible (not covered by later objects, inside the frame), so each of its labels is really depicted.
- train ("sparse", JFT-like): each label of each object is kept independently with probability `train_label_keep`
  and the image gets the union of what was kept (at least one label). With `train_false_label_rate` 0 (every
  variant but "jft_like") noise is omission only: a train label is always true of the image, never invented;
  otherwise that fraction of training images also gets one false label, a class not depicted (uniform), listed in
  `meta["false_labels"]`. `meta["dense_labels"]` keeps the full true set for analysis.

`meta` (JSON-serialisable): {"split", "art", "background", "objects": [{"object": key (the OpenMoji hexcode, e.g.
"1F600"), "name", "box": [x0, y0, x1, y1] (pixels, x1/y1 exclusive, the object's extent inside the frame),
"visible": fraction of the object not covered or cut off, "labels": its dense labels}], "dense_labels" (train only)}.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

DemoSplit = Literal["train", "eval"]
SPLITS: tuple[DemoSplit, ...] = ("train", "eval")
_SPLIT_STREAM = {"train": 1, "eval": 2}  # keeps the two splits' random streams disjoint for the same seed


class DemoAssetsMissing(RuntimeError):
    """A variant's asset packages are not installed; the message names the pip package to install."""


@dataclass(frozen=True)
class DemoSample:
    """One generated image: what the shard writer stores as KEY.jpg and KEY.json."""

    key: str  # unique within a split, filesystem/tar safe: "train-000123"
    jpeg: bytes  # RGB baseline JPEG, image_size x image_size
    labels: list[int]  # class ids, sorted, unique (sparse for train, dense for eval)
    meta: dict[str, Any]  # see the module docstring


@dataclass(frozen=True)
class DemoClass:
    id: int
    name: str  # unique, "kind:value", e.g. "subgroup:animal-mammal"
    kind: str  # "group" | "subgroup" | "tag"


@dataclass(frozen=True)
class ObjectType:
    """A kind of object a scene can contain, e.g. one emoji."""

    key: str  # stable identifier, e.g. the emoji hexcode "1F600"
    name: str  # human-readable, e.g. "grinning face"
    labels: tuple[int, ...]  # dense class ids, sorted
    weight: float  # relative sampling frequency (long-tailed across types)


class Artist(Protocol):
    """Draws object types; the train and eval splits may use different artists (different drawings, same labels)."""

    name: str

    def draw(self, obj: ObjectType, size: int) -> Image.Image:
        """RGBA image whose visible content's longer side is `size` pixels (tightly cropped)."""
        ...


class Backgrounds(Protocol):
    name: str

    def draw(self, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
        """An RGB `size` x `size` background and a short description of it (for meta)."""
        ...


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed; every field is part of what a seed reproduces."""

    image_size: int = 320  # square output side in pixels (a 299 random-resized crop fits)
    jpeg_quality: int = 90
    object_count_weights: tuple[float, ...] = (0.3, 0.25, 0.2, 0.15, 0.1)  # P(1 object), P(2), ... P(5)
    object_scale: tuple[float, float] = (0.2, 0.55)  # object's longer side / image side, log-uniform
    max_rotation: float = 30.0  # degrees, uniform in [-max, max]
    max_outside: float = 0.25  # fraction of an object's width/height that may hang outside the frame
    min_visible: float = 0.7  # fraction of each object's own pixels that must stay visible
    placement_attempts: int = 12
    train_label_keep: float = 0.5  # probability of keeping each label of each object in a train scene
    train_false_label_rate: float = 0.0  # probability that a train scene also gets one label of a class not depicted

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not self.object_count_weights or min(self.object_count_weights) < 0 or sum(self.object_count_weights) <= 0:
            raise ValueError(f"object_count_weights must be >= 0 with a positive sum, got {self.object_count_weights}")
        lo, hi = self.object_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"object_scale must satisfy 0 < low <= high <= 1, got {self.object_scale}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 0 < self.train_label_keep <= 1:
            raise ValueError(f"train_label_keep must be in (0, 1], got {self.train_label_keep}")
        if not 0 <= self.train_false_label_rate <= 1:
            raise ValueError(f"train_false_label_rate must be in [0, 1], got {self.train_false_label_rate}")


@dataclass
class _Placed:
    obj: ObjectType
    image: Image.Image  # RGBA, rotated
    x: int
    y: int
    mask: np.ndarray  # bool, image_size x image_size: the object's pixels inside the frame
    total: int  # the object's own opaque pixel count (inside the frame or not)
    visible: np.ndarray  # mask minus what later objects cover


class DemoDataset:
    """A generated multi-label dataset: `classes`, and `samples()` that produce the same bytes for the same seed.

    Picklable (for worker processes); artists may keep private caches that are not part of the output.
    """

    def __init__(self, name: str, classes: Sequence[DemoClass], objects: Sequence[ObjectType],
                 artists: dict[str, Artist], backgrounds: Backgrounds, config: SceneConfig,
                 attribution: str = "", info: dict[str, Any] | None = None) -> None:
        if [c.id for c in classes] != list(range(len(classes))):
            raise ValueError("class ids must be 0..num_classes-1 in order")
        if set(artists) != set(SPLITS):
            raise ValueError(f"need one artist per split {SPLITS}, got {sorted(artists)}")
        if not objects:
            raise ValueError("the catalog has no object types")
        self.name = name
        self.classes: list[DemoClass] = list(classes)
        self.objects: list[ObjectType] = list(objects)
        self.artists = dict(artists)
        self.backgrounds = backgrounds
        self.config = config
        self.attribution = attribution
        self.info: dict[str, Any] = dict(info or {})
        weights = np.array([o.weight for o in self.objects], dtype=np.float64)
        self._object_p = weights / weights.sum()
        counts = np.array(config.object_count_weights, dtype=np.float64)
        self._count_p = counts / counts.sum()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict[str, Any]:
        """What a manifest should record to say how this data was made (JSON-serialisable)."""
        cfg = self.config
        return {"name": self.name, "num_classes": self.num_classes, "image_size": cfg.image_size,
                "jpeg_quality": cfg.jpeg_quality, "art": {s: a.name for s, a in self.artists.items()},
                "backgrounds": self.backgrounds.name, "train_label_keep": cfg.train_label_keep,
                "train_false_label_rate": cfg.train_false_label_rate,
                "object_count_weights": list(cfg.object_count_weights), "object_scale": list(cfg.object_scale),
                "max_rotation": cfg.max_rotation, "min_visible": cfg.min_visible,
                "labels": {"train": "sparse", "eval": "dense"}, "attribution": self.attribution, **self.info}

    def sample(self, split: DemoSplit, index: int, seed: int) -> DemoSample:
        """Sample `index` of `split`: a pure function of (seed, split, index) and the dataset's settings."""
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seed < 0 or index < 0:
            raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
        image, placed, background = self._compose(rng, self.artists[split])
        objects_meta, dense, kept = [], set(), set()
        for p in placed:
            ys, xs = np.nonzero(p.mask)
            objects_meta.append({"object": p.obj.key, "name": p.obj.name,
                                 "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                                 "visible": round(float(p.visible.sum()) / p.total, 3), "labels": list(p.obj.labels)})
            dense.update(p.obj.labels)
            if split == "train":
                keep = rng.random(len(p.obj.labels)) < self.config.train_label_keep
                kept.update(label for label, k in zip(p.obj.labels, keep, strict=True) if k)
        if split == "train" and not kept:
            kept.add(int(rng.choice(sorted(dense))))
        false = self._false_labels(rng, dense) if split == "train" else []
        labels = sorted(kept | set(false)) if split == "train" else sorted(dense)
        meta: dict[str, Any] = {"split": split, "art": self.artists[split].name, "background": background,
                                "objects": objects_meta}
        if split == "train":
            meta["dense_labels"] = sorted(dense)
        if false:
            meta["false_labels"] = false
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.config.jpeg_quality)
        return DemoSample(key=f"{split}-{index:06d}", jpeg=buf.getvalue(), labels=labels, meta=meta)

    def _false_labels(self, rng: np.random.Generator, dense: set[int]) -> list[int]:
        """With probability `train_false_label_rate`, one class the scene does not depict (JFT's automatic labels
        are sometimes wrong); no random number is drawn at rate 0, so the other variants' streams are unchanged."""
        rate = self.config.train_false_label_rate
        if rate == 0 or rng.random() >= rate:
            return []
        absent = [c for c in range(self.num_classes) if c not in dense]
        return [int(rng.choice(absent))] if absent else []

    def samples(self, split: DemoSplit, count: int, seed: int, start: int = 0) -> Iterator[DemoSample]:
        """Samples start .. start+count-1 of `split`, in order, in this process."""
        for index in range(start, start + count):
            yield self.sample(split, index, seed)

    def generate(self, split: DemoSplit, count: int, seed: int, start: int = 0, workers: int | None = None,
                 progress: bool = True, chunk: int = 16) -> Iterator[DemoSample]:
        """The same samples as `samples()`, made by `workers` processes (default: all cores), in order, with a
        tqdm progress bar. Worker processes are spawned (safe after torch or threads are up; a calling script needs
        the usual `if __name__ == "__main__":` guard) and end with the iterator."""
        from tqdm import tqdm

        workers = workers or os.cpu_count() or 1
        bar = tqdm(total=count, desc=f"demo {self.name} {split}", unit="img", disable=not progress)
        try:
            if workers <= 1 or count <= chunk:
                for s in self.samples(split, count, seed, start):
                    bar.update(1)
                    yield s
                return
            starts = range(start, start + count, chunk)
            tasks = [(split, s, min(chunk, start + count - s), seed) for s in starts]
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(self,)) as pool:
                for batch in pool.imap(_work, tasks):
                    bar.update(len(batch))
                    yield from batch
        finally:
            bar.close()

    # -- composition ------------------------------------------------------------------------------------------

    def _compose(self, rng: np.random.Generator, artist: Artist) -> tuple[Image.Image, list[_Placed], str]:
        cfg, size = self.config, self.config.image_size
        background, background_name = self.backgrounds.draw(rng, size)
        n = 1 + int(rng.choice(len(self._count_p), p=self._count_p))
        chosen = rng.choice(len(self.objects), size=n, p=self._object_p)
        lo, hi = cfg.object_scale
        placed: list[_Placed] = []
        for i in chosen:
            obj = self.objects[int(i)]
            side = max(8, round(size * math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
            art = artist.draw(obj, side)
            if angle:
                art = art.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
            alpha = np.asarray(art.getchannel("A")) > 127
            total = int(alpha.sum())
            if total == 0:
                continue
            p = self._place(rng, obj, art, alpha, total, placed)
            if p is not None:
                placed.append(p)
        for p in placed:
            background.paste(p.image.convert("RGB"), (p.x, p.y), p.image.getchannel("A"))
        if not placed:  # every candidate failed to fit: vanishingly rare; draw the first one centred and small
            obj = self.objects[int(chosen[0])]
            art = artist.draw(obj, size // 3)
            alpha = np.asarray(art.getchannel("A")) > 127
            x, y = (size - art.width) // 2, (size - art.height) // 2
            mask = np.zeros((size, size), dtype=bool)
            mask[y:y + art.height, x:x + art.width] = alpha
            placed.append(_Placed(obj, art, x, y, mask, int(alpha.sum()), mask.copy()))
            background.paste(art.convert("RGB"), (x, y), art.getchannel("A"))
        return background, placed, background_name

    def _place(self, rng: np.random.Generator, obj: ObjectType, art: Image.Image, alpha: np.ndarray, total: int,
               placed: list[_Placed]) -> _Placed | None:
        """Find a position where this object and every object under it stay `min_visible` visible."""
        cfg, size = self.config, self.config.image_size
        h, w = alpha.shape
        need = cfg.min_visible
        for _ in range(cfg.placement_attempts):
            mx, my = int(w * cfg.max_outside), int(h * cfg.max_outside)
            x = int(rng.integers(-mx, max(-mx, size - w + mx) + 1))
            y = int(rng.integers(-my, max(-my, size - h + my) + 1))
            mask = np.zeros((size, size), dtype=bool)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
            if x1 <= x0 or y1 <= y0:
                continue
            mask[y0:y1, x0:x1] = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
            if mask.sum() < need * total:
                continue
            if any((q.visible & ~mask).sum() < need * q.total for q in placed):
                continue
            for q in placed:
                q.visible &= ~mask
            return _Placed(obj, art, x, y, mask, total, mask.copy())
        return None


_WORKER_DATASET: DemoDataset | None = None


def _init_worker(dataset: DemoDataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _work(task: tuple[DemoSplit, int, int, int]) -> list[DemoSample]:
    split, start, count, seed = task
    assert _WORKER_DATASET is not None
    return list(_WORKER_DATASET.samples(split, count, seed, start))


def zipf_weights(n: int, exponent: float, seed: int) -> np.ndarray:
    """Long-tailed weights for n items: rank r gets (r+1)^-exponent, ranks a fixed permutation drawn from `seed`."""
    ranks = np.random.default_rng(seed).permutation(n)
    return (ranks + 1.0) ** -exponent


def build_classes(named: Sequence[tuple[str, str]]) -> tuple[list[DemoClass], dict[tuple[str, str], int]]:
    """Classes from (kind, value) pairs in the given order; names are "kind:value"."""
    classes = [DemoClass(i, f"{kind}:{value}", kind) for i, (kind, value) in enumerate(named)]
    return classes, {kv: i for i, kv in enumerate(named)}

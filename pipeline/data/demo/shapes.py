"""The shape variants, "tiny" and "jft_like": procedurally drawn shapes, needing only Pillow and NumPy.

"tiny" (unit tests and CI): object types are (shape, colour, fill) triples, e.g. a striped red star. Labels mirror
the OpenMoji variant's hierarchy: group (round / polygon / symbol), subgroup (the shape), tags (the colour, the
fill, and "colour shape"). Types are drawn with Zipf-like frequencies, so classes are long-tailed. Train scenes use
flat drawings; eval scenes use a second "artist" (dark outlines, stripes the other way), as the OpenMoji variant
evaluates on Twemoji art.

"jft_like": the same shapes made hard the way JFT is, at a size a 2-core machine learns in minutes.
JFT (the paper's section 4.1) has 17,000 classes whose frequencies span orders of magnitude, labels from an
automatic pipeline (often missing, sometimes wrong) and classes that are combinations of others; FastEval14k, its
evaluation set, is labelled densely. The demo variants learn easily by comparison (the emoji's classes are mostly
single attributes), so a recipe tuned on them can fail on the tail without anyone seeing it. This variant keeps:

- **combinations**: 115 classes: 10 colours, 9 shapes, 3 shape groups and 3 fills (single attributes) and the 90
  "colour shape" classes that bind a colour to a shape ("red star" is true only where one object is both: an image
  with a red circle and a blue star is "red" and "star" but not "red star");
- **a long tail**: a colour-shape pair's share of the objects is rank^-`JFT_LIKE_ZIPF_EXPONENT` (ranks a fixed,
  seeded permutation), so the pairs' training frequencies span about 90x; fills are uniform within a pair;
- **noisy, missing training labels**: each true label of each object is kept with probability
  `JFT_LIKE_LABEL_KEEP` (20% of true labels dropped) and `JFT_LIKE_FALSE_LABEL_RATE` of the training images get one
  false label (a class not depicted);
- **dense, exact evaluation labels**: every label of every placed object.

The objects are drawn like the "tiny" variant's (flat shapes on noise fields), so the data is generated in
seconds; the second artist (`eval_artist=second`) outlines them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from pipeline.data.demo.scene import DemoDataset, ObjectType, SceneConfig, build_classes, zipf_weights

SHAPE_GROUPS = {"circle": "round", "ring": "round", "triangle": "polygon", "square": "polygon",
                "diamond": "polygon", "pentagon": "polygon", "hexagon": "polygon", "star": "symbol", "cross": "symbol"}
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 30), "green": (40, 170, 60),
           "cyan": (30, 190, 210), "blue": (40, 80, 210), "purple": (130, 60, 190), "pink": (240, 120, 180),
           "white": (245, 245, 245), "black": (25, 25, 25)}
FILLS = ("solid", "striped", "outline")
CATALOG_SEED = 20170404  # fixes which types are common; part of the dataset's definition, not of a sample's seed
ZIPF_EXPONENT = 1.0
JFT_LIKE_ZIPF_EXPONENT = 1.0  # Zipf's law; the pairs then span 90x, the rarest ~20 objects in 3,000 images
JFT_LIKE_LABEL_KEEP = 0.8  # 20% of true training labels are dropped
JFT_LIKE_FALSE_LABEL_RATE = 0.1  # one training image in ten gets one label of a class it does not show
JFT_LIKE_CATALOG_SEED = 20170405  # fixes which pairs are common; part of the dataset's definition


def _regular(n: int, start: float = -90.0, radii: tuple[float, ...] = (0.5,)) -> list[tuple[float, float]]:
    pts = []
    for k in range(n * len(radii)):
        r = radii[k % len(radii)]
        a = math.radians(start + 360.0 * k / (n * len(radii)))
        pts.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return pts


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.5, 0.0), (1.0, 0.93), (0.0, 0.93)],
    "square": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "pentagon": _regular(5),
    "hexagon": _regular(6, start=0.0),
    "star": _regular(5, radii=(0.5, 0.2)),
    "cross": [(0.33, 0.0), (0.67, 0.0), (0.67, 0.33), (1.0, 0.33), (1.0, 0.67), (0.67, 0.67), (0.67, 1.0),
              (0.33, 1.0), (0.33, 0.67), (0.0, 0.67), (0.0, 0.33), (0.33, 0.33)],
}


class ShapeArtist:
    """Draws (shape, colour, fill) object types; `outlined` is the second artist used for the eval split."""

    def __init__(self, outlined: bool) -> None:
        self.outlined = outlined
        self.name = "shapes-outlined" if outlined else "shapes-flat"

    def draw(self, obj: ObjectType, size: int) -> Image.Image:
        shape, colour, fill = obj.key.split("-")
        ss = 2 * size  # supersample, then downscale: anti-aliased edges
        mask = Image.new("L", (ss, ss), 0)
        if fill == "outline":
            _draw_shape(ImageDraw.Draw(mask), shape, ss, fill=0, outline_width=max(2, round(0.14 * ss)))
        else:
            _draw_shape(ImageDraw.Draw(mask), shape, ss, fill=255, outline_width=0)
        rgb = COLOURS[colour]
        body = Image.new("RGB", (ss, ss), rgb)
        if fill == "striped":
            light = tuple(round(0.35 * c + 0.65 * 255) for c in rgb)
            period = max(6, ss // 5)
            d = ImageDraw.Draw(body)
            for k in range(-ss, 2 * ss, period):
                ends = [(k, 0), (k - ss, ss)] if self.outlined else [(k, 0), (k + ss, ss)]
                d.line(ends, fill=light, width=period // 2)
        if self.outlined:
            line = Image.new("L", (ss, ss), 0)
            _draw_shape(ImageDraw.Draw(line), shape, ss, fill=0, outline_width=max(2, round(0.05 * ss)))
            ink = (235, 235, 235) if colour == "black" else (20, 20, 20)
            body.paste(ink, (0, 0, ss, ss), line)
            mask = ImageChops.lighter(mask, line)
        body.putalpha(mask)
        return body.resize((size, size), Image.Resampling.LANCZOS)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, ss: int, fill: int, outline_width: int) -> None:
    """Draw a filled shape (fill=255, outline_width=0) or only its outline (fill=0, outline_width>0) in 255."""
    m = ss - 1
    if shape in ("circle", "ring"):
        d.ellipse((0, 0, m, m), fill=fill or None, outline=255 if outline_width else None, width=outline_width)
        if shape == "ring":
            hole = round(0.27 * ss)
            d.ellipse((hole, hole, m - hole, m - hole), fill=0, outline=255 if outline_width else None,
                      width=outline_width)
        return
    pts = [(x * m, y * m) for x, y in _POLYGONS[shape]]
    d.polygon(pts, fill=fill or None, outline=255 if outline_width else None, width=outline_width)


class NoiseBackgrounds:
    """Smooth random colour fields with fine grain: cheap stand-ins for photographic textures."""

    name = "procedural-noise"

    def draw(self, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
        coarse = rng.integers(30, 226, size=(4, 4, 3)).astype(np.float32)
        coarse = 0.4 * coarse + 0.6 * coarse.mean(axis=2, keepdims=True)  # muted, so coloured shapes stand out
        field = Image.fromarray(coarse.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
        field = np.asarray(field, dtype=np.float32)
        grain_side = max(2, size // 4)
        grain = Image.fromarray(rng.integers(0, 256, size=(grain_side, grain_side), dtype=np.uint8), "L")
        grain_f = np.asarray(grain.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) - 127.5
        out = np.clip(field + 0.25 * grain_f[..., None], 0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB"), "noise"


SHAPE_KEYS = [(s, c, f) for s in SHAPE_GROUPS for c in COLOURS for f in FILLS]  # the object types, in order


def open_tiny(config: SceneConfig, outlined_eval: bool = True) -> DemoDataset:
    """The shapes dataset: 270 object types, 115 classes (3 groups, 9 shapes, 10 colours, 3 fills, 90 pairs)."""
    groups = list(dict.fromkeys(SHAPE_GROUPS.values()))
    named = ([("group", g) for g in groups] + [("subgroup", s) for s in SHAPE_GROUPS]
             + [("tag", c) for c in COLOURS] + [("tag", f) for f in FILLS]
             + [("tag", f"{c} {s}") for s in SHAPE_GROUPS for c in COLOURS])
    kinds = {"group": "group", "shape": "subgroup", "colour": "tag", "fill": "tag", "pair": "tag"}
    weights = zipf_weights(len(SHAPE_KEYS), ZIPF_EXPONENT, CATALOG_SEED)
    return shapes_dataset("tiny", named, kinds, weights, config, outlined_eval, info={"variant": "tiny"})


def open_jft_like(config: SceneConfig, outlined_eval: bool = False) -> DemoDataset:
    """The JFT-like dataset (115 classes, 270 object types: 90 Zipf-weighted colour-shape pairs x 3 fills)."""
    groups = list(dict.fromkeys(SHAPE_GROUPS.values()))
    named = ([("colour", c) for c in COLOURS] + [("shape", s) for s in SHAPE_GROUPS]
             + [("group", g) for g in groups] + [("fill", f) for f in FILLS]
             + [("pair", f"{c} {s}") for s in SHAPE_GROUPS for c in COLOURS])
    pairs = zipf_weights(len(SHAPE_GROUPS) * len(COLOURS), JFT_LIKE_ZIPF_EXPONENT, JFT_LIKE_CATALOG_SEED)
    weights = np.repeat(pairs, len(FILLS)) / len(FILLS)  # SHAPE_KEYS order: the fills of a pair side by side
    return shapes_dataset("jft_like", named, {kind: kind for kind in ("group", "shape", "colour", "fill", "pair")},
                          weights, config, outlined_eval,
                          info={"variant": "jft_like", "zipf_exponent": JFT_LIKE_ZIPF_EXPONENT})


def shapes_dataset(name: str, named: list[tuple[str, str]], kinds: dict[str, str], weights: Sequence[float],
                   config: SceneConfig, outlined_eval: bool, info: dict[str, Any]) -> DemoDataset:
    """A dataset of drawn shapes: one object type per `SHAPE_KEYS` entry, sampled by its entry of `weights`,
    labelled with the `named` classes of its group, shape, colour, fill and colour-shape pair (`kinds` gives each
    attribute's class kind)."""
    classes, index = build_classes(named)
    objects = []
    for (s, c, f), w in zip(SHAPE_KEYS, weights, strict=True):
        values = {"group": SHAPE_GROUPS[s], "shape": s, "colour": c, "fill": f, "pair": f"{c} {s}"}
        labels = sorted({index[kinds[attribute], value] for attribute, value in values.items()})
        objects.append(ObjectType(key=f"{s}-{c}-{f}", name=f"{f} {c} {s}", labels=tuple(labels), weight=float(w)))
    return DemoDataset(name, classes, objects, {"train": ShapeArtist(False), "eval": ShapeArtist(outlined_eval)},
                       NoiseBackgrounds(), config, attribution="Procedurally drawn shapes (no third-party art).",
                       info=info)

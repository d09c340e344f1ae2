"""The "jft_like" demo variant: JFT's hard parts at a size a 2-core machine learns in minutes.

JFT (the paper's section 4.1) has 17,000 classes whose frequencies span orders of magnitude, labels from an
automatic pipeline (often missing, sometimes wrong) and classes that are combinations of others; FastEval14k, its
evaluation set, is labelled densely. The demo variants learn easily by comparison (the emoji's classes are mostly
single attributes), so a recipe tuned on them can fail on the tail without anyone seeing it. This variant keeps:

- **combinations**: 115 classes: 10 colours, 9 shapes, 3 shape groups and 3 fills (single attributes) and the 90
  "colour shape" classes that bind a colour to a shape ("red star" is true only where one object is both: an image
  with a red circle and a blue star is "red" and "star" but not "red star");
- **a long tail**: a colour-shape pair's share of the objects is rank^-`ZIPF_EXPONENT` (ranks a fixed, seeded
  permutation), so the pairs' training frequencies span about 90x; fills are uniform within a pair;
- **noisy, missing training labels**: each true label of each object is kept with probability `LABEL_KEEP` (20% of
  true labels dropped) and `FALSE_LABEL_RATE` of the training images get one false label (a class not depicted);
- **dense, exact evaluation labels**: every label of every placed object.

The objects are drawn like the "tiny" variant's (flat shapes on noise fields; Pillow and NumPy only), so the data
is generated in seconds; the second artist (`eval_artist=second`) outlines them.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.demo.scene import DemoDataset, SceneConfig, zipf_weights
from pipeline.data.demo.tiny import COLOURS, FILLS, SHAPE_GROUPS, shapes_dataset

ZIPF_EXPONENT = 1.0  # Zipf's law; the pairs then span 90x, the rarest ~20 objects in 3,000 images
LABEL_KEEP = 0.8  # 20% of true training labels are dropped
FALSE_LABEL_RATE = 0.1  # one training image in ten gets one label of a class it does not show
CATALOG_SEED = 20170405  # fixes which pairs are common; part of the dataset's definition


def open_jft_like(config: SceneConfig, outlined_eval: bool = False) -> DemoDataset:
    """The JFT-like dataset (115 classes, 270 object types: 90 Zipf-weighted colour-shape pairs x 3 fills)."""
    groups = list(dict.fromkeys(SHAPE_GROUPS.values()))
    named = ([("colour", c) for c in COLOURS] + [("shape", s) for s in SHAPE_GROUPS]
             + [("group", g) for g in groups] + [("fill", f) for f in FILLS]
             + [("pair", f"{c} {s}") for s in SHAPE_GROUPS for c in COLOURS])
    pairs = zipf_weights(len(SHAPE_GROUPS) * len(COLOURS), ZIPF_EXPONENT, CATALOG_SEED)
    weights = np.repeat(pairs, len(FILLS)) / len(FILLS)  # SHAPE_KEYS order: the fills of a pair side by side
    return shapes_dataset("jft_like", named, {kind: kind for kind in ("group", "shape", "colour", "fill", "pair")},
                          weights, config, outlined_eval, info={"variant": "jft_like", "zipf_exponent": ZIPF_EXPONENT})

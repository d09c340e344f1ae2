"""The model package format: a trained Xception as files anyone can load without the training code.

A package is a directory at any fsspec URL::

    <package>/model.safetensors  the weights (a state dict; EMA or raw, see model.json)
              model.pt2          optional: a `torch.export` program (float images -> logits, dynamic batch)
              model.onnx         optional: the same program as ONNX
              model.json         written last (it publishes the package): what the files are and how to use them

model.json (format version 1)::

    {"format": "xception-pipeline-model", "version": 1,
     "architecture": {"name": "xception", "num_classes": 600, "fc_layers": [], "dropout": 0.0,
                      "width_multiplier": 1.0, "middle_blocks": 8, "in_chans": 3},
     "input": {"image_size": 299, "layout": "NCHW", "channels": "RGB", "pixels": "uint8",
               "preprocess": "x / 127.5 - 1"},
     "output": {"activation": "sigmoid"},              # or "softmax": how logits become probabilities
     "classes": ["cat", ...],                          # class id -> name
     "thresholds": {...} | null,                       # a `pipeline.models.thresholds` file, inline
     "weights": {"file": "model.safetensors", "kind": "ema", "sha256": "..."},
     "programs": {"torch_export": {"file": "model.pt2", ...}, "onnx": {"file": "model.onnx", "opset": 18, ...}},
     "source": {"run": ..., "checkpoint": ..., "step": ..., ...}, "created": 1764600000.0, "torch": "2.13.0"}

`architecture` holds exactly the keyword arguments of `pipeline.models.xception.Xception`, so a reader needs torch,
safetensors and this module (no `pipeline.train`). Exported programs take the preprocessed float input
(`preprocess_input`), like the eager model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import safetensors.torch
import torch

from pipeline.config import ModelConfig, StorageConfig
from pipeline.models.thresholds import ClassThresholds, ThresholdsError
from pipeline.models.xception import Xception
from pipeline.storage import exists, join_url, read_bytes, upload_file, write_bytes

FORMAT = "xception-pipeline-model"
VERSION = 1
MANIFEST_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILES = {"torch_export": "model.pt2", "onnx": "model.onnx"}
ARCHITECTURE_KEYS = ("num_classes", "fc_layers", "dropout", "width_multiplier", "middle_blocks", "in_chans")
PREPROCESS = "x / 127.5 - 1"  # `preprocess_input`: uint8 pixels to [-1, 1]

__all__ = ["FORMAT", "MANIFEST_FILE", "PROGRAM_FILES", "VERSION", "WEIGHTS_FILE", "ModelPackage", "PackageError",
           "architecture_options", "build_architecture", "new_package", "program_url", "read_package",
           "read_package_manifest", "write_package"]


class PackageError(ValueError):
    """A model package that cannot be written or used; the message names the URL and what is wrong."""


class ModelPackage(NamedTuple):
    """A model ready for inference: the Xception (eval mode), its class names, per-class thresholds (or None) and
    the model.json record describing it (architecture, input, output, weights, source)."""

    model: Xception
    classes: list[str]
    thresholds: ClassThresholds | None
    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        """The square input side the model was exported at (its training crops' size, unless chosen otherwise)."""
        return int(self.metadata["input"]["image_size"])

    @property
    def activation(self) -> str:
        """"sigmoid" (multi-label: one probability per class) or "softmax" (one label per image)."""
        return str(self.metadata["output"]["activation"])


def architecture_options(model: ModelConfig) -> dict[str, Any]:
    """The `Xception` keyword arguments that fix the weights' shapes and the eval-mode forward of `model.*`.

    `head_bias` (an initial value) and `checkpoint_middle_flow` (a training memory saving) do not matter once the
    weights are loaded, so they are left out."""
    return {"name": model.name, "num_classes": model.num_classes, "fc_layers": list(model.fc_layers),
            "dropout": model.dropout, "width_multiplier": model.width_multiplier,
            "middle_blocks": model.middle_blocks, "in_chans": 3}


def build_architecture(architecture: Mapping[str, Any], source: str = MANIFEST_FILE) -> Xception:
    """A freshly initialised Xception (eval mode) of the given architecture; unknown or missing keys are refused."""
    options = dict(architecture)
    name = options.pop("name", None)
    if name != "xception" or set(options) != set(ARCHITECTURE_KEYS):
        raise PackageError(f"{source}: architecture must be name='xception' with the keys {list(ARCHITECTURE_KEYS)}; "
                           f"got name={name!r} and {sorted(options)}")
    return Xception(**options).eval()


def new_package(model: Xception, architecture: Mapping[str, Any], classes: Sequence[str], *, image_size: int,
                activation: Literal["sigmoid", "softmax"], weights: Literal["ema", "raw"],
                thresholds: ClassThresholds | None = None, source: Mapping[str, Any] | None = None,
                center_crop: float = 1.0) -> ModelPackage:
    """Describe `model` (weights already loaded) as a package, checking that the names fit it.

    The architecture must rebuild a model with exactly `model`'s state-dict keys and shapes; there must be one class
    name per logit; thresholds, when given, must be for the same classes in the same order."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = build_architecture(architecture, source="architecture").state_dict()
    found = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in found.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        missing, extra = sorted(expected.keys() - found.keys())[:3], sorted(found.keys() - expected.keys())[:3]
        raise PackageError(f"the model does not match architecture {dict(architecture)} (missing {missing}, "
                           f"unexpected {extra}, or other shapes)")
    if len(classes) != architecture["num_classes"]:
        raise PackageError(f"{len(classes)} class names for a model with {architecture['num_classes']} classes")
    if thresholds is not None and list(thresholds.classes) != list(classes):
        raise PackageError("the thresholds are for other classes than the model's (names or order differ)")
    metadata = {
        "format": FORMAT, "version": VERSION, "architecture": dict(architecture),
        "input": {"image_size": image_size, "layout": "NCHW", "channels": "RGB", "pixels": "uint8",
                  "preprocess": PREPROCESS, "center_crop": center_crop},
        "output": {"activation": activation}, "classes": list(classes),
        "thresholds": json.loads(thresholds.to_json()) if thresholds is not None else None,
        "weights": {"file": WEIGHTS_FILE, "kind": weights}, "programs": {}, "source": dict(source or {}),
    }
    return ModelPackage(model.eval(), list(classes), thresholds, metadata)


def write_package(url: str, package: ModelPackage, programs: Mapping[str, str] | None = None,
                  extra: Mapping[str, Any] | None = None, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Write `package` to `url` (any fsspec URL): the weights, the exported `programs` ({format: local file}, e.g.
    {"onnx": "/tmp/x/model.onnx"}), then model.json, last; returns the model.json record.

    `extra` is merged into each program's model.json entry (e.g. how it was checked). Every file is written
    atomically; large ones go through a local temporary file, not memory."""
    unknown = sorted(set(programs or {}) - set(PROGRAM_FILES))
    if unknown:
        raise PackageError(f"unknown program format(s) {unknown}; known: {sorted(PROGRAM_FILES)}")
    metadata = json.loads(json.dumps(package.metadata))  # a copy, filled in below
    tensors = {name: t.detach().cpu().contiguous() for name, t in package.model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="xception-package-") as scratch:
        local = os.path.join(scratch, WEIGHTS_FILE)
        safetensors.torch.save_file(tensors, local, metadata={"format": FORMAT, "version": str(VERSION)})
        metadata["weights"]["sha256"] = _sha256(local)
        upload_file(local, join_url(url, WEIGHTS_FILE), storage)
    for fmt, path in (programs or {}).items():
        upload_file(path, join_url(url, PROGRAM_FILES[fmt]), storage)
        metadata["programs"][fmt] = {"file": PROGRAM_FILES[fmt], "sha256": _sha256(path),
                                     **dict((extra or {}).get(fmt, {}))}
    metadata.update(created=time.time(), torch=torch.__version__.split("+")[0])
    write_bytes(join_url(url, MANIFEST_FILE), json.dumps(metadata, indent=1).encode("utf-8"), storage)
    return metadata


def read_package_manifest(url: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The model.json of the package at `url`, checked for format and version."""
    source = join_url(url, MANIFEST_FILE)
    if not exists(source, storage):
        raise PackageError(f"{url} is not a model package: it has no {MANIFEST_FILE}")
    try:
        metadata = json.loads(read_bytes(source, storage))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        found = (metadata.get("format"), metadata.get("version")) if isinstance(metadata, dict) else metadata
        raise PackageError(f"{source}: not a model package of format {FORMAT} version {VERSION} (found {found!r})")
    return metadata


def read_package(url: str, storage: StorageConfig | None = None,
                 map_location: str | torch.device = "cpu") -> ModelPackage:
    """The package at `url`: the rebuilt Xception with its weights (eval mode), classes, thresholds and model.json.

    The weights must match model.json's checksum and fit its architecture exactly (no missing or extra tensors)."""
    metadata = read_package_manifest(url, storage)
    source = join_url(url, MANIFEST_FILE)
    try:
        model = build_architecture(metadata["architecture"], source)
        weights_url = join_url(url, metadata["weights"]["file"])
        classes, inline = list(metadata["classes"]), metadata["thresholds"]
        thresholds = None if inline is None else ClassThresholds.from_json(json.dumps(inline), source=source)
    except (KeyError, TypeError, ThresholdsError) as exc:
        raise PackageError(f"{source}: missing or malformed field: {exc!r}") from None
    data = read_bytes(weights_url, storage)
    if hashlib.sha256(data).hexdigest() != metadata["weights"].get("sha256"):
        raise PackageError(f"{weights_url}: checksum differs from {source} (a damaged or replaced file)")
    try:
        model.load_state_dict(safetensors.torch.load(data))
    except RuntimeError as exc:
        raise PackageError(f"{weights_url} does not fit the architecture in {source}: {exc}") from None
    if len(classes) != model.num_classes:
        raise PackageError(f"{source}: {len(classes)} class names for {model.num_classes} logits")
    return ModelPackage(model.to(map_location).eval(), classes, thresholds, metadata)


def program_url(url: str, fmt: str, storage: StorageConfig | None = None) -> str:
    """The URL of the package's exported program of format `fmt` ("torch_export" or "onnx")."""
    programs = read_package_manifest(url, storage).get("programs", {})
    if fmt not in programs:
        raise PackageError(f"{url} has no {fmt!r} program (it has: {sorted(programs) or 'none'}); export it with "
                           f"export.formats including {fmt}")
    return join_url(url, programs[fmt]["file"])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


"""Export a run's checkpoint as a model package: the weights and model.json, plus checked torch.export / ONNX files.

Every program is checked before it is published: it is loaded back from its file and run on real images (from
`export.check_data`, else the checkpoint's evaluation data, else its training data; decoded and centre-cropped by
the project's loader as evaluation does) at batch sizes 1 and `export.check_images`, and its logits must match the
eager model's within `export.tolerance`. The largest difference, the batch sizes and the export time are recorded
in model.json. The package goes to `<run>/export/step-NNNNNNNNN` unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.checkpoint.format import read_checkpoint_config, run_dir_of, step_dir_name
from pipeline.config import Config, StorageConfig
from pipeline.data.loading import ShardStream
from pipeline.inference.model_source import package_from_checkpoint, resolve_checkpoint
from pipeline.models import preprocess_input
from pipeline.models.package import PROGRAM_FILES, ModelPackage, write_package
from pipeline.models.programs import check_program, export_program, load_program, require_packages
from pipeline.storage import join_url

log = logging.getLogger(__name__)

EXPORTS = "export"


@dataclass(frozen=True)
class ExportResult:
    url: str  # the package directory
    metadata: dict[str, Any]  # its model.json


def default_package_url(run_dir: str, step: int) -> str:
    """Where a run's checkpoint `step` is exported unless told otherwise: <run>/export/step-NNNNNNNNN."""
    return join_url(run_dir, EXPORTS, step_dir_name(step))


def check_images(prefix: str, config: Config, count: int, image_size: int,
                 storage: StorageConfig | None = None) -> torch.Tensor:
    """The first `count` images of the dataset at `prefix` as uint8 (count, 3, image_size, image_size), decoded and
    centre-cropped as evaluation does (`config.data`'s evaluation settings), in this process."""
    data = config.data.model_copy(update={"image_size": image_size, "loader_workers": 0})
    stream = ShardStream(prefix, data, batch_size=count, rank=0, world_size=1, train=False, storage=storage)
    for batch in stream:
        images = batch.images[batch.valid].contiguous()
        if images.shape[0] < count:
            break
        return images
    raise ValueError(f"{prefix} has fewer than {count} readable images to check the exported programs on; "
                     f"lower export.check_images or set export.check_data")


def _check_prefix(settings: Config, saved: Config) -> str:
    prefix = settings.export.check_data or saved.data.eval or saved.data.train
    if prefix is None:
        raise ValueError("no images to check the exported programs on: set export.check_data to a dataset prefix")
    return prefix


def export_programs(package: ModelPackage, images: torch.Tensor, settings: Config,
                    scratch: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Export each program format of `settings.export.formats` into `scratch` and check it on `images` (float,
    preprocessed); returns ({format: local file}, {format: what model.json records about it})."""
    options = settings.export
    files, records = {}, {}
    batch_sizes = [1, images.shape[0]]
    for fmt in (f for f in options.formats if f in PROGRAM_FILES):
        path = os.path.join(scratch, PROGRAM_FILES[fmt])
        log.info("exporting %s to %s ...", fmt, PROGRAM_FILES[fmt])
        seconds = export_program(package.model, fmt, images[:2], path, opset=options.opset)
        difference = check_program(load_program(path, fmt), package.model, images, batch_sizes, options.tolerance,
                                   name=fmt)
        log.info("%s: exported in %.1f s; max |logit - eager| %.2e on %d real images at batch sizes %s", fmt,
                 seconds, difference, images.shape[0], batch_sizes)
        files[fmt] = path
        records[fmt] = {"export_seconds": round(seconds, 2), "max_abs_logit_difference": difference,
                        "checked_batch_sizes": batch_sizes, "tolerance": options.tolerance}
        if fmt == "onnx":
            records[fmt]["opset"] = options.opset
    return files, records


def export_model(source: str, settings: Config, out: str | None = None) -> ExportResult:
    """Export the checkpoint `source` (a checkpoint URL, or a run directory: its latest complete checkpoint) as a
    model package at `out` (default `default_package_url`), with `settings.export`'s formats and weights."""
    options, storage = settings.export, settings.storage
    require_packages([f for f in options.formats if f in PROGRAM_FILES])  # before any large read
    checkpoint = resolve_checkpoint(source, storage)
    package = package_from_checkpoint(checkpoint.url, options.weights, storage, image_size=options.image_size)
    out = out or default_package_url(run_dir_of(checkpoint.url), checkpoint.step)
    log.info("exporting %s (step %d, %s weights) to %s", checkpoint.url, checkpoint.step, options.weights, out)
    with tempfile.TemporaryDirectory(prefix="xception-export-") as scratch:
        files: dict[str, str] = {}
        records: dict[str, dict[str, Any]] = {}
        if len(options.formats) > 1:
            saved = read_checkpoint_config(checkpoint.url, storage)
            prefix = _check_prefix(settings, saved)
            pixels = check_images(prefix, saved, options.check_images, package.image_size, storage)
            files, records = export_programs(package, preprocess_input(pixels), settings, scratch)
            for record in records.values():
                record["checked_on"] = prefix
        metadata = write_package(out, package, files, extra=records, storage=storage)
    log.info("wrote the model package %s (%s)", out, ", ".join(options.formats))
    return ExportResult(url=out, metadata=metadata)

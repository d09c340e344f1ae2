"""Batch prediction on Ray Data: input parts -> decoded images -> model replicas -> one output file per part.

The pipeline (`ray_results`), the same command on a laptop or a cluster::

    from_items(parts) -> map_batches(image_row_tables)        Ray tasks: shard tars / files -> (key, bytes) rows
                      -> map_batches(decode_batch)            Ray tasks: the evaluator's decode (center crop
                                                              data.augment.eval_crop_fraction, resize to
                                                              data.image_size; pipeline.data.loading.decode)
                      -> map_batches(PredictBatches,          actors, predict.concurrency of them, each with
                                     ActorPoolStrategy)       predict.num_gpus / num_cpus, loading the model once
                      -> iter_batches on the driver           rows gathered per part; a complete part is written

Decoding runs in tasks rather than in the replicas so that it scales with the cluster's CPUs while GPUs run the
model. The driver writes the parts itself (`PartCollector`, `pipeline.inference.output`) because Ray Data's
`write_parquet` names its files per run and cannot tell a finished part from an unfinished one; the rows that
reach the driver are small (key, top-k, labels). An image that cannot be read or decoded becomes a row with its
error; it is counted in the summary and listed in `failures.jsonl`, never a crash. `local_results` runs the same
stages in this process without Ray (tests, debugging).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.cluster import connect_ray
from pipeline.config import AugmentConfig, Config, PredictConfig, StorageConfig
from pipeline.data.loading import BadSampleError, decode_image
from pipeline.inference.inputs import input_kind, plan_parts, read_part
from pipeline.inference.model_source import Predictor, load_predictor
from pipeline.inference.output import OUTPUT_SCHEMA, check_identity, finished_parts, write_part, write_summary
from pipeline.models import preprocess_input

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # reading is I/O-bound: a read task must never wait for the CPUs the replicas hold
ROW_SCHEMA = pa.schema([("part", pa.int64()), ("index", pa.int64()), ("key", pa.string()), ("image", pa.binary()),
                        ("error", pa.string()), ("part_rows", pa.int64())])
PASSED_ON = ("part", "index", "part_rows")  # the columns every stage hands on unchanged
Columns = dict[str, np.ndarray]  # a batch as Ray Data's "numpy" format hands it over


def image_row_tables(parts: pa.Table, storage: StorageConfig | None) -> Iterator[pa.Table]:
    """Ray Data stage: planned parts -> their image rows (and one trailer row per part), in tables of <= 256."""
    for part in parts.to_pylist():
        for rows in read_part(part, storage):
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _texts(column: np.ndarray) -> list[str | None]:
    """A nullable string column as Ray Data hands it over: an all-null one arrives as NaN floats, not Nones."""
    return [value if isinstance(value, str) else None for value in column]


def decode_batch(batch: Columns, image_size: int, crop_fraction: float, decoder: str) -> Columns:
    """Ray Data stage: image bytes -> uint8 (N, S, S, 3) pixels as the evaluator decodes them; a row that fails
    gets its error (and zero pixels)."""
    count = len(batch["key"])
    pixels = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    slots = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # channels-last views, the layout decode_image writes
    augment = AugmentConfig(random_resized_crop=False, horizontal_flip=False, eval_crop_fraction=crop_fraction)
    errors = _texts(batch["error"])
    for i in range(count):
        if batch["part_rows"][i] >= 0 or errors[i] is not None:
            continue
        try:
            decode_image(bytes(batch["image"][i]), image_size, augment, train=False, rng=random.Random(0),
                         decoder=decoder, out=slots[i])  # type: ignore[arg-type]
        except BadSampleError as exc:
            errors[i] = f"undecodable: {exc.detail}"
    return {**{name: batch[name] for name in PASSED_ON}, "key": np.array(_texts(batch["key"]), dtype=object),
            "error": np.array(errors, dtype=object), "pixels": pixels}


class PredictBatches:
    """Ray Data stage (a callable class: one per replica, the model loaded once): pixels -> top-k and labels."""

    def __init__(self, predictor: Predictor, top_k: int, precision: str, num_cpus: float) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(num_cpus)))
        self.model = predictor.build(self.device).to(memory_format=torch.channels_last)
        self.classes = np.array(predictor.classes, dtype=object)
        self.thresholds = predictor.thresholds
        self.top_k = min(top_k, len(predictor.classes))
        self.bf16 = precision == "bf16"

    def scores(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 -> (N, C) sigmoid probabilities, fp32 on the CPU."""
        images = preprocess_input(torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2))
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return torch.sigmoid(self.model(images).float()).cpu()

    def __call__(self, batch: Columns) -> pa.Table:
        count, errors = len(batch["key"]), _texts(batch["error"])
        good = (batch["part_rows"] < 0) & np.array([error is None for error in errors], dtype=bool)
        top_classes: list[list[str]] = [[] for _ in range(count)]
        top_scores: list[list[float]] = [[] for _ in range(count)]
        labels: list[list[str]] = [[] for _ in range(count)]
        if good.any():
            probabilities = self.scores(np.ascontiguousarray(batch["pixels"][good]))
            top = probabilities.topk(self.top_k, dim=1)
            decided = self.thresholds.decide(probabilities) if self.thresholds is not None else None
            for row, i in enumerate(np.flatnonzero(good)):
                top_classes[i] = self.classes[top.indices[row].numpy()].tolist()
                top_scores[i] = top.values[row].tolist()
                if decided is not None:
                    labels[i] = self.classes[decided[row].numpy()].tolist()
        columns = {**{name: batch[name] for name in PASSED_ON}, "key": _texts(batch["key"]),
                   "top_classes": top_classes, "top_scores": top_scores, "labels": labels, "error": errors}
        schema = pa.schema([*((name, pa.int64()) for name in PASSED_ON), *OUTPUT_SCHEMA])
        return pa.table(columns, schema=schema)


class PartCollector:
    """Gathers result rows per part on the driver and writes each part once all its rows are in (the trailer row
    tells how many that is)."""

    def __init__(self, output: str, parts: list[dict], fmt: str, storage: StorageConfig | None) -> None:
        self.output, self.fmt, self.storage = output, fmt, storage
        self.parts = {p["part"]: p for p in parts}
        self.tables: dict[int, list[pa.Table]] = {}
        self.expected: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.markers: dict[int, dict] = {}

    def add(self, table: pa.Table) -> int:
        """Take a batch of results; returns the number of image rows in it."""
        images = 0
        part_ids = table["part"].to_numpy()
        trailer = table["part_rows"].to_numpy()
        for part in np.unique(part_ids).tolist():
            mine = part_ids == part
            for expected in trailer[mine & (trailer >= 0)].tolist():
                self.expected[part] = expected
            rows = table.filter(pa.array(mine & (trailer < 0)))
            images += rows.num_rows
            self.tables.setdefault(part, []).append(rows)
            self.received[part] = self.received.get(part, 0) + rows.num_rows
            if self.received[part] == self.expected.get(part):
                self._write(part)
        return images

    def _write(self, part: int) -> None:
        table = pa.concat_tables(self.tables.pop(part)).sort_by("index")  # input order
        self.markers[part] = write_part(self.output, self.parts[part], table, self.fmt, self.storage)

    @property
    def pending(self) -> list[int]:
        return sorted(self.tables)


def ray_results(parts: list[dict], predictor: Predictor, settings: PredictConfig,
                storage: StorageConfig | None) -> Iterator[pa.Table]:
    """The Ray Data pipeline over `parts` (see the module doc); result tables as they complete."""
    import ray

    _check_cpus(settings, ray.cluster_resources().get("CPU", 0.0))
    ray.data.DataContext.get_current().enable_progress_bars = not settings.progress  # ours counts images
    dataset = ray.data.from_items(parts, override_num_blocks=max(1, len(parts)))
    dataset = dataset.map_batches(image_row_tables, fn_kwargs={"storage": storage}, batch_size=1,
                                  batch_format="pyarrow", num_cpus=READ_CPUS)
    dataset = dataset.map_batches(decode_batch, batch_size=settings.batch_size, batch_format="numpy",
                                  num_cpus=settings.decode_cpus, fn_kwargs=_decode_settings(predictor))
    dataset = dataset.map_batches(
        PredictBatches, fn_constructor_kwargs=_replica_settings(predictor, settings), batch_size=settings.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=settings.concurrency),
        num_cpus=settings.num_cpus, num_gpus=settings.num_gpus or None)
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def cpu_needs(settings: PredictConfig) -> tuple[float, float]:
    """(CPUs the replicas hold for the whole run, CPUs the larger of a read and a decode task needs beside them)."""
    return settings.concurrency * settings.num_cpus, max(READ_CPUS, settings.decode_cpus)


def stalls(settings: PredictConfig, cluster_cpus: float) -> bool:
    """Whether the pipeline can never progress on `cluster_cpus` CPUs: the replicas hold their CPUs for the whole
    run, so a read or decode task that does not fit in what they leave never starts. Reading and decoding need not
    run at the same time (their tasks take turns), so only the larger of the two must fit: the defaults, one replica
    of 1 CPU beside decode tasks of 1 CPU, run on 2 cores (warning when all three did not fit at once was wrong)."""
    return sum(cpu_needs(settings)) > cluster_cpus


def _check_cpus(settings: PredictConfig, cluster_cpus: float) -> None:
    """Warn when the pipeline `stalls` as the cluster is now: it waits for CPUs that an autoscaling cluster may add
    and a fixed one never gets."""
    if stalls(settings, cluster_cpus):
        replicas, task = cpu_needs(settings)
        log.warning("predict.concurrency=%d x predict.num_cpus=%g hold %g CPUs for the whole run and a read or decode "
                    "task needs %g beside them (predict.decode_cpus=%g), but the cluster has %g CPUs now: unless it "
                    "scales up, prediction stalls; lower predict.concurrency, predict.num_cpus or predict.decode_cpus",
                    settings.concurrency, settings.num_cpus, replicas, task, settings.decode_cpus, cluster_cpus)


def local_results(parts: list[dict], predictor: Predictor, settings: PredictConfig,
                  storage: StorageConfig | None) -> Iterator[pa.Table]:
    """The same stages in this process, without Ray."""
    replica = PredictBatches(**_replica_settings(predictor, settings))
    for part in parts:
        for rows in read_part(part, storage):
            table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
            for start in range(0, table.num_rows, settings.batch_size):
                chunk = table.slice(start, settings.batch_size)
                batch = {name: chunk[name].to_numpy(zero_copy_only=False) for name in chunk.column_names}
                yield replica(decode_batch(batch, **_decode_settings(predictor)))


def _decode_settings(predictor: Predictor) -> dict[str, Any]:
    return {"image_size": predictor.image_size, "crop_fraction": predictor.augment.eval_crop_fraction,
            "decoder": predictor.decoder}


def _replica_settings(predictor: Predictor, settings: PredictConfig) -> dict[str, Any]:
    return {"predictor": predictor, "top_k": settings.top_k, "precision": settings.precision,
            "num_cpus": settings.num_cpus}


def run_prediction(config: Config, *, use_ray: bool = True) -> dict[str, Any]:
    """Predict `predict.input` into `predict.output` with the model of `predict.model` (default: the run's latest
    checkpoint), skipping parts a previous run finished; returns the summary (also in <output>/summary.json)."""
    settings, storage = config.predict, config.storage
    if not settings.input or not settings.output:
        raise ValueError("prediction needs predict.input (shards, a folder or a URL list) and predict.output")
    predictor = load_predictor(settings.model or config.run_dir, storage, settings.weights)
    kind = input_kind(settings.input, storage) if settings.input_kind == "auto" else settings.input_kind
    parts = plan_parts(settings.input, kind, settings.rows_per_part, storage)
    identity = {"model": predictor.weights_url, "step": predictor.step, "weights": settings.weights,
                "thresholds_step": predictor.thresholds.step if predictor.thresholds else None,
                "top_k": settings.top_k, "format": settings.format, "input": settings.input, "input_kind": kind}
    check_identity(settings.output, identity, storage)
    done = finished_parts(settings.output, parts, storage)
    todo = [part for part in parts if part["part"] not in done]
    log.info("%s (%s): %d parts, %d done before and skipped; predicting %d images", settings.input, kind,
             len(parts), len(done), sum(p["rows"] for p in todo))
    collector = PartCollector(settings.output, todo, settings.format, storage)
    start = time.perf_counter()
    if todo and use_ray:
        connect_ray(config)
    results = (ray_results if use_ray else local_results)(todo, predictor, settings, storage) if todo else iter(())
    with tqdm(total=sum(p["rows"] for p in todo), unit="img", disable=not settings.progress) as bar:
        for table in results:
            bar.update(collector.add(table))
    if collector.pending:
        raise RuntimeError(f"parts {collector.pending} did not receive all their rows; re-run to predict them")
    seconds = time.perf_counter() - start
    predicted = sum(m["rows"] for m in collector.markers.values())
    summary = write_summary(settings.output, [*done.values(), *collector.markers.values()], {
        "model": predictor.weights_url, "step": predictor.step, "this_run": {
            "parts": len(collector.markers), "skipped_parts": len(done), "images": predicted,
            "seconds": round(seconds, 3), "images_per_second": round(predicted / seconds, 2) if seconds else None}})
    log.info("%d images in %s: %d failed (listed in %s); this run %d images in %.1f s (%.1f images/s), %d parts "
             "skipped as done", summary["images"], settings.output, summary["failed"], summary["failures"], predicted,
             seconds, predicted / seconds if seconds else 0.0, len(done))
    return summary

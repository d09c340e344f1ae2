"""Reports people read: `reports/map100.jsonl` (one line per checkpoint) and a self-contained `report.html`.

The HTML embeds its PNG plots as data URIs, so the one file can be downloaded from object storage and opened
anywhere; the PNGs are also written beside it. Plots: MAP@100 vs training samples, MAP@100 of the head, middle and
tail thirds of the classes by training frequency vs training samples (`pipeline.evaluation.frequency_thirds`),
per-class AP vs class frequency, the best and worst classes, and example eval images with their top predictions vs
true labels. A table gives the latest evaluation's thirds (class counts, frequency ranges) beside the baselines.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are rendered on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from pipeline.config import StorageConfig
from pipeline.evaluation.evaluator import Evaluation
from pipeline.evaluation.frequency_thirds import THIRDS
from pipeline.storage import exists, join_url, read_bytes, write_bytes

log = logging.getLogger(__name__)

RESULTS_FILE = "map100.jsonl"
HTML_FILE = "report.html"


def read_records(reports_dir: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Every evaluation recorded so far, one per step (its first line), in step order (a torn last line from a
    crash is ignored, with a warning)."""
    url = join_url(reports_dir, RESULTS_FILE)
    if not exists(url, storage):
        return []
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(read_bytes(url, storage).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line ignored", url, number)
            continue
        records.setdefault(record["step"], record)
    return [records[step] for step in sorted(records)]


def append_record(reports_dir: str, record: dict[str, Any], storage: StorageConfig | None = None) -> None:
    """Add `record` unless its step is already recorded: idempotent per step, so a retried evaluation adds nothing.

    Object stores cannot append, so the file is read and rewritten (each write atomic). One evaluator per run is
    expected: two writing at the same moment can drop one's new line, which a later pass evaluates again.
    """
    records = read_records(reports_dir, storage)
    if any(r["step"] == record["step"] for r in records):
        log.info("step %d is already in %s; its first line is kept", record["step"], RESULTS_FILE)
        return
    body = "".join(json.dumps(r) + "\n" for r in sorted([*records, record], key=lambda r: r["step"]))
    write_bytes(join_url(reports_dir, RESULTS_FILE), body.encode("utf-8"), storage)


def headline(k: int, orientation: str) -> tuple[str, str]:
    """The record key and label of the headline MAP@K (`eval.orientation`): per class (the paper's) or per image."""
    return (f"map@{k}", f"MAP@{k}") if orientation == "class" else (f"image_map@{k}", f"MAP@{k} per image")


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_map_curve(records: list[dict[str, Any]], k: int) -> bytes:
    """MAP@K per class and per image over training, each with its class-prior (dashed) and random (dotted)
    baseline on the same evaluation set: the floor a learning model must leave behind."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [r.get("samples_seen") or r["step"] for r in records]
    baselines = next((r["baselines"] for r in reversed(records) if r.get("baselines")), None)
    for key, what, note in ((f"map@{k}", "per class", ", paper"), (f"image_map@{k}", "per image", "")):
        (line,) = ax.plot(x, [100 * r.get(key, float("nan")) for r in records], marker="o",
                          label=f"MAP@{k} ({what}{note})")
        if baselines:
            for name, style, scorer in (("prior", "--", "class-prior"), ("random", ":", "random")):
                ax.axhline(100 * baselines[name][key], color=line.get_color(), linestyle=style, linewidth=1,
                           label=f"{scorer} scores ({what})")
    ax.set_xlabel("training samples seen" if records and records[0].get("samples_seen") else "step")
    ax.set_ylabel("%")
    ax.set_title(f"MAP@{k} on the evaluation set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def plot_frequency_thirds(records: list[dict[str, Any]], k: int) -> bytes | None:
    """MAP@K of the head, middle and tail thirds over training, each with its class-prior baseline (dashed): where
    the headline comes from. None when no record has the thirds (reports written before they were recorded)."""
    records = [r for r in records if f"head_map@{k}" in r]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [r.get("samples_seen") or r["step"] for r in records]
    prior = (records[-1].get("baselines") or {}).get("prior") or {}
    for third in THIRDS:
        key = f"{third}_map@{k}"
        values = [100 * r[key] if r.get(key) is not None else float("nan") for r in records]
        (line,) = ax.plot(x, values, marker="o", label=f"{third} third ({records[-1][f'{third}_classes']} classes)")
        if prior.get(key) is not None:
            ax.axhline(100 * prior[key], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"class prior, {third}")
    ax.set_xlabel("training samples seen" if records[0].get("samples_seen") else "step")
    ax.set_ylabel(f"MAP@{k} per class (%)")
    ax.set_title(f"MAP@{k} by training frequency of the class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def plot_ap_vs_frequency(ap: np.ndarray, frequency: np.ndarray, valid: np.ndarray, k: int) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.scatter(np.maximum(frequency[valid], 1), 100 * ap[valid], s=8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("class frequency (training labels, log)")
    ax.set_ylabel(f"AP@{k} (%)")
    ax.set_title("per-class AP vs how common the class is")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_best_worst(ap: np.ndarray, valid: np.ndarray, names: list[str], k: int, count: int = 10) -> bytes:
    ids = np.flatnonzero(valid)
    order = ids[np.argsort(-ap[ids], kind="stable")]
    best, worst = order[:count], order[::-1][:count]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * count + 1.5))
    for ax, chosen, title in ((axes[0], best, "best classes"), (axes[1], worst, "worst classes")):
        ax.barh([names[i][:30] for i in chosen][::-1], (100 * ap[chosen])[::-1])
        ax.set_title(title)
        ax.set_xlabel(f"AP@{k} (%)")
    fig.tight_layout()
    return _png(fig)


def plot_examples(examples: list[dict[str, Any]], names: list[str]) -> bytes:
    cols = max(1, min(4, len(examples)))
    rows = max(1, -(-len(examples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples, strict=False):
        ax.imshow(ex["image"])
        truth = set(ex["labels"])
        lines = [f"{'+' if c in truth else '-'} {names[c][:22]} {p:.2f}" for c, p in ex["top"][:4]]
        ax.set_title("\n".join(lines), fontsize=7, loc="left", family="monospace")
        shown = [names[c][:24] for c in sorted(truth)[:6]]
        more = f" +{len(truth) - len(shown)} more" if len(truth) > len(shown) else ""
        ax.text(0, -0.02, f"{ex['key']}, true:\n" + "\n".join(shown) + more, transform=ax.transAxes, fontsize=6.5,
                va="top", family="monospace")
    fig.suptitle("top predictions (+ = a true label) with probabilities; the true labels below each image",
                 fontsize=9)
    return _png(fig)


def write_report(reports_dir: str, latest: Evaluation, class_names: list[str], class_frequency: np.ndarray,
                 storage: StorageConfig | None = None) -> str:
    """Regenerate the PNGs and `report.html` from all records plus the latest evaluation; returns the HTML URL."""
    records = read_records(reports_dir, storage)
    result = latest.result
    k = result.k
    ap = result.per_class_ap.cpu().numpy()
    valid = result.class_valid.cpu().numpy()
    plots = {"map_curve.png": plot_map_curve(records, k)}
    thirds = plot_frequency_thirds(records, k)
    if thirds is not None:
        plots["map_by_frequency.png"] = thirds
    plots["ap_vs_frequency.png"] = plot_ap_vs_frequency(ap, class_frequency, valid, k)
    plots["best_worst_classes.png"] = plot_best_worst(ap, valid, class_names, k)
    if latest.examples:
        plots["examples.png"] = plot_examples(latest.examples, class_names)
    for name, png in plots.items():
        write_bytes(join_url(reports_dir, name), png, storage)
    write_bytes(join_url(reports_dir, HTML_FILE), render_html(records, latest, plots).encode("utf-8"), storage)
    return join_url(reports_dir, HTML_FILE)


def thirds_table(record: dict[str, Any], k: int) -> str:
    """HTML: the head, middle and tail thirds of the classes by training frequency, each with its class count,
    frequency range and MAP@K beside the class-prior and random scores; "" for a record without thirds."""
    if f"head_map@{k}" not in record:
        return ""
    baselines = record.get("baselines") or {}
    ranges = record.get("frequency_thirds") or {}

    def percent(scores: dict | None, third: str) -> str:
        value = (scores or {}).get(f"{third}_map@{k}")
        return "n/a" if value is None else f"{100 * value:.2f}%"

    rows = "".join(
        f"<tr><td>{third}</td><td>{record[f'{third}_classes']}</td>"
        f"<td>{record[f'{third}_classes_with_positives']}</td>"
        f"<td>{' - '.join(f'{v:g}' for v in dict.fromkeys(ranges.get(third) or []))}</td>"
        f"<td>{percent(record, third)}</td>"
        f"<td>{percent(baselines.get('prior'), third)}</td><td>{percent(baselines.get('random'), third)}</td></tr>"
        for third in THIRDS)
    return (f"<h2>MAP@{k} by training frequency</h2><p>The classes ranked by how often they label a training image, "
            "cut into thirds; each third's MAP averages its classes with an evaluation positive.</p>"
            "<table><tr><th>third</th><th>classes</th><th>with eval positives</th><th>training frequency</th>"
            f"<th>MAP@{k}</th><th>class prior</th><th>random</th></tr>{rows}</table>")


def render_html(records: list[dict[str, Any]], latest: Evaluation, plots: dict[str, bytes]) -> str:
    k = latest.result.k
    columns = ["step", "samples_seen", f"map@{k}", *(f"{t}_map@{k}" for t in THIRDS), f"image_map@{k}",
               f"class_recall@{k}", "precision@1", "precision@5", "num_images", "eval_seconds"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else html.escape(str(value))

    rows = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in records)
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in plots.items())
    scalars = latest.result.scalars()
    key, label = headline(k, latest.config.eval.orientation)
    floor = ""
    if latest.baselines:
        b = latest.baselines
        floor = (f"<p>Baselines on the same images (no model): class prior {100 * b['prior'][f'map@{k}']:.2f}% "
                 f"per class, {100 * b['prior'][f'image_map@{k}']:.2f}% per image; random scores "
                 f"{100 * b['random'][f'map@{k}']:.2f}% per class, {100 * b['random'][f'image_map@{k}']:.2f}% per "
                 "image. A model near the class prior has learned the label frequencies, not the images.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MAP@{k} report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>{label}: {100 * scalars[key]:.2f}% at step {latest.step}</h1>
<p>Checkpoint <code>{html.escape(latest.checkpoint)}</code> ({html.escape(latest.config.eval.weights)} weights,
class weighting {html.escape(latest.config.eval.class_weights)}); {scalars["num_images"]:.0f} images,
{scalars["num_classes_with_positives"]:.0f} classes with positives. MAP@{k} ranks the images for each class
(AP normalised by min({k}, positives), as TensorFlow's <code>average_precision_at_k</code>).</p>
{floor}
{thirds_table(latest.record(), k)}
<div style="overflow-x:auto"><table><tr>{head}</tr>{rows}</table></div>
{images}
</body></html>
"""

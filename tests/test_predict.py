"""Batch prediction: inputs (shards, folders, URL lists), the model's scores against the evaluator's, decision labels,
bad images as rows, resumable part output; once through Ray Data (slow)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.config import PredictConfig, load_config
from pipeline.data.format import class_fingerprint, read_classes, read_manifest
from pipeline.data.loading import ShardStream, to_device
from pipeline.inference.export import export_model
from pipeline.inference.inputs import input_kind, list_images, plan_parts, read_part, read_url_list
from pipeline.inference.model_source import load_predictor
from pipeline.inference.output import OUTPUT_SCHEMA
from pipeline.inference.predict import _check_cpus, run_prediction, stalls
from pipeline.models import preprocess_input
from pipeline.models.thresholds import ClassThresholds, thresholds_url, write_thresholds
from pipeline.train.step import build_train_state, train_step


@pytest.fixture(autouse=True)
def _torch_threads():
    """Prediction run in this process (`run_prediction` without Ray) sets torch's thread count for its replica, as
    each Ray Data replica does in its own process; the tests after these get the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(demo, tmp_path, *overrides):
    return load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                f"data.train={demo.train}", f"data.eval={demo.eval}",
                                f"model.num_classes={demo.num_classes}", f"run.storage={tmp_path}/runs",
                                "train.ema_decay=0.5", "checkpoint.background=false", "predict.top_k=3",
                                "predict.batch_size=16", "predict.progress=false", *overrides])


def _trained_run(demo, tmp_path, *overrides):
    """A run with one checkpoint after two training steps (so EMA and raw weights differ), its classes recorded."""
    config = _config(demo, tmp_path, *overrides)
    state = build_train_state(config)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(state, config, torch.rand(4, 3, 71, 71, generator=g) * 2 - 1,
                   (torch.rand(4, demo.num_classes, generator=g) < 0.1).float())
    fingerprint = class_fingerprint(demo.train, read_manifest(demo.train))
    Checkpointer(config.run_dir, config).save(2, state.state_dict(), extra={"class_fingerprint": fingerprint})
    return config


def _names(demo):
    return [c.name for c in read_classes(demo.train, read_manifest(demo.train))]


def _image_folder(demo, root: Path) -> list[str]:
    """Eval JPEGs extracted into root/a and root/b/c, one re-encoded as PNG, a corrupt image, a non-image file."""
    shard = read_manifest(demo.eval).shard_urls(demo.eval)[0]
    with tarfile.open(shard) as tar:
        jpegs = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".jpg")][:5]
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    for i, (name, data) in enumerate(jpegs[:4]):
        (root / ("a" if i < 2 else "b/c") / name).write_bytes(data)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[4][1])).save(png, format="PNG")
    (root / "b" / "image.png").write_bytes(png.getvalue())
    (root / "b" / "broken.jpg").write_bytes(jpegs[0][1][:200])  # truncated
    (root / "notes.txt").write_text("not an image")
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".jpg", ".png"))


def test_sources_plan_and_read_every_input_kind(tiny_demo, tmp_path):
    files = _image_folder(tiny_demo, tmp_path / "images")
    folder = str(tmp_path / "images")
    assert input_kind(tiny_demo.eval) == "shards" and input_kind(folder) == "folder"
    assert list_images(folder) == files  # recursive, sorted, images only
    listing = tmp_path / "list.csv"
    listing.write_text("id,url\n" + "".join(f"{i},{f}\n" for i, f in enumerate(files)) + f"9,{tmp_path}/gone.jpg\n")
    assert input_kind(str(listing)) == "urls"
    assert read_url_list(str(listing)) == [*files, f"{tmp_path}/gone.jpg"]
    text = tmp_path / "list.txt"
    text.write_text(f"# images\n{files[0]}\n\n{files[1]}\n")
    assert read_url_list(str(text)) == files[:2]
    with pytest.raises(ValueError, match=r"predict.input=.*nowhere: not found"):
        input_kind(str(tmp_path / "nowhere"))

    parts = plan_parts(str(listing), "urls", 4, None)
    assert [p["rows"] for p in parts] == [4, 3] and parts[0]["paths"] == files[:4]
    rows = [row for chunk in read_part(parts[1]) for row in chunk]
    assert rows[-1] == {"part": 1, "index": 3, "key": None, "image": None, "error": None, "part_rows": 3}  # trailer
    assert rows[-2]["key"].endswith("gone.jpg") and rows[-2]["error"].startswith("unreadable")
    shards = plan_parts(tiny_demo.eval, "shards", 4, None)
    assert [p["rows"] for p in shards] == [s.samples for s in read_manifest(tiny_demo.eval).shards]
    shard_rows = [row for chunk in read_part(shards[0]) for row in chunk]
    assert len(shard_rows) == shards[0]["rows"] + 1 and shard_rows[0]["image"][:2] == b"\xff\xd8"
    assert len({p["digest"] for p in shards}) == len(shards)


def test_shards_written_by_other_tools_give_their_images_also_under_dotted_keys(tmp_path):
    """webdataset's key ends at the first dot of a member's basename: "cat.001.png" is key "cat", member "001.png"."""
    import io as bytes_io

    import webdataset as wds
    from PIL import Image

    png = bytes_io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    with wds.TarWriter(str(tmp_path / "foreign.tar")) as writer:
        writer.write({"__key__": "cat.001", "png": png.getvalue(), "cls": b"3"})
        writer.write({"__key__": "dog", "webp": png.getvalue()})
        writer.write({"__key__": "fish", "cls": b"1"})
    part = {"part": 0, "shard": str(tmp_path / "foreign.tar"), "paths": [], "rows": 3, "digest": "x"}
    rows = {row["key"]: row for chunk in read_part(part) for row in chunk}
    assert rows["cat"]["image"] == rows["dog"]["image"] == png.getvalue()
    assert rows["fish"]["image"] is None and rows["fish"]["error"].startswith("no image member")


def test_corrupt_shard_becomes_one_error_row(tiny_demo, tmp_path):
    shard = read_manifest(tiny_demo.eval).shard_urls(tiny_demo.eval)[0]
    broken = tmp_path / "broken.tar"
    data = Path(shard).read_bytes()
    broken.write_bytes(data[: len(data) // 2] + b"\x13" * 1000)
    part = {"part": 0, "shard": str(broken), "paths": [], "rows": 40, "digest": "x"}
    rows = [row for chunk in read_part(part) for row in chunk]
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and failed[0]["key"] == str(broken) and failed[0]["error"].startswith("corrupt shard")
    assert 0 < rows[-1]["part_rows"] < 40 + 1


def test_shard_predictions_are_the_evaluators_scores_with_threshold_labels(tiny_demo, tmp_path):
    config = _trained_run(tiny_demo, tmp_path, f"predict.input={tiny_demo.eval}", f"predict.output={tmp_path}/out")
    names = _names(tiny_demo)
    # Class 0 always applies, class 1 never, the others at 0.5: labels follow the thresholds file of the step.
    thresholds = ClassThresholds(classes=names, thresholds=[0.0, 1.0] + [0.5] * (len(names) - 2),
                                 global_threshold=0.5, min_positives=5, step=2)
    write_thresholds(thresholds_url(config.run_dir, 2), thresholds)
    summary = run_prediction(config, use_ray=False)
    assert summary["images"] == 80 and summary["failed"] == 0 and summary["step"] == 2
    table = pq.read_table(f"{tmp_path}/out/part-000000.parquet")
    assert table.schema == OUTPUT_SCHEMA
    rows = {row["key"]: row for part in sorted((tmp_path / "out").glob("part-*.parquet"))
            for row in pq.read_table(part).to_pylist()}
    assert len(rows) == 80
    # Reference: the evaluator's loader (center crop, eval decode) and the checkpoint's EMA weights.
    model = load_predictor(config.run_dir).build(torch.device("cpu"))
    stream = ShardStream(tiny_demo.eval, config.data, batch_size=16, rank=0, world_size=1, train=False)
    with torch.inference_mode():
        for batch in stream:
            pixels, _ = to_device(batch, "cpu", tiny_demo.num_classes)
            probabilities = torch.sigmoid(model(preprocess_input(pixels)))
            for i in batch.valid.nonzero().squeeze(1).tolist():
                row = rows[batch.keys[i]]
                top = probabilities[i].topk(3)
                assert row["top_scores"] == pytest.approx(top.values.tolist(), abs=1e-5)
                assert row["top_classes"] == [names[c] for c in top.indices.tolist()]
                expected = [names[0]] + [names[c] for c in range(2, len(names)) if probabilities[i, c] >= 0.5]
                assert row["labels"] == expected
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == 80


def test_an_exported_package_predicts_as_its_run_does(tiny_demo, tmp_path):
    """The prediction job runs from a model package (jobs/export_model.py) as from the run directory: same rows."""
    config = _trained_run(tiny_demo, tmp_path, f"predict.input={tiny_demo.eval}", "export.formats=[safetensors]")
    names = _names(tiny_demo)
    write_thresholds(thresholds_url(config.run_dir, 2), ClassThresholds(
        classes=names, thresholds=[0.5] * len(names), global_threshold=0.5, min_positives=5, step=2))
    package = export_model(config.run_dir, config, out=f"{tmp_path}/package").url
    from_run = config.model_copy(update={"predict": config.predict.model_copy(update={"output": f"{tmp_path}/a"})})
    from_package = config.model_copy(update={"predict": config.predict.model_copy(
        update={"output": f"{tmp_path}/b", "model": package})})
    assert run_prediction(from_package, use_ray=False)["images"] == run_prediction(from_run, use_ray=False)["images"]
    rows = [{row["key"]: row for part in sorted((tmp_path / out).glob("part-*.parquet"))
             for row in pq.read_table(part).to_pylist()} for out in ("a", "b")]
    assert rows[0].keys() == rows[1].keys() and len(rows[0]) == 80
    for key, row in rows[0].items():
        assert rows[1][key]["top_classes"] == row["top_classes"] and rows[1][key]["labels"] == row["labels"]
        assert rows[1][key]["top_scores"] == pytest.approx(row["top_scores"], abs=1e-6)


def test_folder_and_url_list_bad_images_are_rows_and_a_rerun_skips_finished_parts(tiny_demo, tmp_path, caplog):
    files = _image_folder(tiny_demo, tmp_path / "images")
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join([*files, str(tmp_path / "gone.jpg")]) + "\n")
    out = tmp_path / "out"
    config = _trained_run(tiny_demo, tmp_path, f"predict.input={listing}", f"predict.output={out}",
                          "predict.rows_per_part=3", "predict.format=jsonl")
    with caplog.at_level(logging.WARNING):
        first = run_prediction(config, use_ray=False)
    assert "no decision thresholds" in caplog.text
    assert first["images"] == 7 and first["failed"] == 2 and first["parts"] == 3
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["key"].rsplit("/", 1)[-1] for f in failures] == ["broken.jpg", "gone.jpg"]
    assert failures[0]["error"].startswith("undecodable") and failures[1]["error"].startswith("unreadable")
    rows = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert [r["key"] for r in rows] == [*files, str(tmp_path / "gone.jpg")]
    assert all(r["labels"] == [] and (len(r["top_classes"]) == 3) == (r["error"] is None) for r in rows)

    (out / "part-000001.jsonl").unlink()
    (out / "_progress" / "part-000001.json").unlink()  # as if the job died while writing part 1
    before = {p: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
    second = run_prediction(config, use_ray=False)
    assert second["this_run"] == {**second["this_run"], "parts": 1, "skipped_parts": 2, "images": 3}
    assert second["images"] == 7 and second["failed"] == 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished parts untouched
    again = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert again == rows
    with pytest.raises(ValueError, match=r"already holds other predictions \(top_k: 3 there, 5 now\)"):
        run_prediction(config.model_copy(update={"predict": config.predict.model_copy(update={"top_k": 5})}),
                       use_ray=False)


def test_the_stall_warning_fires_only_when_a_task_cannot_fit_beside_the_replicas(caplog):
    """The defaults on 2 cores never stalled: reading and decoding take turns beside the replica."""
    defaults = PredictConfig()
    with caplog.at_level(logging.WARNING):
        _check_cpus(defaults, 2.0)  # 1 replica x 1 CPU, then a decode task of 1 CPU or a read task of 0.25
        assert caplog.text == ""
        _check_cpus(defaults.model_copy(update={"concurrency": 2}), 2.0)  # two replicas hold both cores
    assert ("predict.concurrency=2 x predict.num_cpus=1 hold 2 CPUs for the whole run and a read or decode task "
            "needs 1 beside them (predict.decode_cpus=1), but the cluster has 2 CPUs now: unless it scales up, "
            "prediction stalls") in caplog.text
    assert stalls(defaults, 1.5) and not stalls(defaults.model_copy(update={"decode_cpus": 0.5}), 1.5)


@pytest.mark.slow
def test_prediction_job_on_ray_data_over_shards_and_a_folder(tiny_demo, tmp_path, caplog):
    """jobs/predict.py through Ray Data (2 replicas) gives the same rows as the in-process stages."""
    import importlib.util

    import ray

    _image_folder(tiny_demo, tmp_path / "images")
    config = _trained_run(tiny_demo, tmp_path)
    spec = importlib.util.spec_from_file_location("predict_job", Path(__file__).parents[1] / "jobs/predict.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    common = [f"run.storage={tmp_path}/runs", f"model.num_classes={tiny_demo.num_classes}", "predict.top_k=3",
              "predict.batch_size=16", "predict.concurrency=2", "predict.num_cpus=0.75", "predict.decode_cpus=0.25",
              "predict.rows_per_part=4"]
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # our own, not one already running here
    try:
        for name, source in (("shards", tiny_demo.eval), ("folder", str(tmp_path / "images"))):
            assert job.main(["--config", "demo", *common, f"predict.input={source}",
                             f"predict.output={tmp_path}/ray-{name}"]) == 0
            local = config.model_copy(update={"predict": config.predict.model_copy(update={
                "input": source, "output": f"{tmp_path}/local-{name}", "rows_per_part": 4})})
            run_prediction(local, use_ray=False)
            for part in sorted((tmp_path / f"local-{name}").glob("part-*.parquet")):
                ray_rows = pq.read_table(tmp_path / f"ray-{name}" / part.name).to_pylist()
                local_rows = pq.read_table(part).to_pylist()
                assert [r["key"] for r in ray_rows] == [r["key"] for r in local_rows]
                for a, b in zip(ray_rows, local_rows, strict=True):
                    assert a["top_classes"] == b["top_classes"] and a["error"] == b["error"]
                    assert a["top_scores"] == pytest.approx(b["top_scores"], abs=1e-5)
        with caplog.at_level(logging.WARNING):  # the predict.* defaults on these 2 CPUs: no stall, and no warning
            assert job.main(["--config", "demo", *common[:3], f"predict.input={tiny_demo.eval}",
                             f"predict.output={tmp_path}/ray-defaults"]) == 0
        assert "stalls" not in caplog.text
        assert json.loads((tmp_path / "ray-defaults" / "summary.json").read_text())["images"] == 80
    finally:
        ray.shutdown()
    summary = json.loads((tmp_path / "ray-folder" / "summary.json").read_text())
    assert summary["images"] == 6 and summary["failed"] == 1

"""The checkpoint-watching evaluator: one report line per complete checkpoint, idempotent, never a partial one."""

import dataclasses
import json
import logging
import re
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import copy_with_swapped_classes, restarted_after
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.format import COMMIT, step_dir_name
from pipeline.cluster import FORWARDED_ENV, connect_ray
from pipeline.config import config_to_yaml, load_config
from pipeline.data.format import class_fingerprint, read_classes, read_manifest, write_classes
from pipeline.data.loading import ShardStream, to_device
from pipeline.evaluation import evaluator
from pipeline.evaluation.class_weights import class_weights
from pipeline.evaluation.evaluator import evaluate_checkpoint, load_weights, ray_options, resolve_config
from pipeline.evaluation.map_metric import evaluate_map_at_k
from pipeline.evaluation.report import append_record, read_records, render_html
from pipeline.evaluation.threshold_fit import ThresholdCounts
from pipeline.evaluation.watcher import CheckpointWatcher, start_background_evaluator
from pipeline.models import preprocess_input
from pipeline.models.thresholds import read_thresholds, thresholds_url
from pipeline.storage import StorageError, join_url, read_bytes, write_bytes
from pipeline.train.step import build_train_state, train_step


def _config(demo, tmp_path, *overrides):
    return load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                f"data.train={demo.train}", f"data.eval={demo.eval}",
                                f"model.num_classes={demo.num_classes}", f"run.storage={tmp_path}",
                                "train.ema_decay=0.5", "eval.batch_size=16", "checkpoint.background=false",
                                *overrides])


def _checkpoints(demo, tmp_path, steps=(1, 2)):
    config = _config(demo, tmp_path)
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        train_step(state, config, torch.rand(4, 3, 71, 71, generator=g) * 2 - 1,
                   (torch.rand(4, demo.num_classes, generator=g) < 0.1).float())
        saver.save(step, state.state_dict())
    return config, state


def test_eval_data_with_other_classes_is_refused(tiny_demo, tmp_path):
    config = _config(tiny_demo, tmp_path)
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    classes = class_fingerprint(tiny_demo.train, read_manifest(tiny_demo.train))
    saver.save(1, state.state_dict(), extra={"class_fingerprint": classes})
    url = join_url(config.run_dir, "checkpoints", step_dir_name(1))
    assert evaluate_checkpoint(url, config).result.num_images == 80  # the eval set shares the training classes
    swapped = copy_with_swapped_classes(tiny_demo.eval, tmp_path / "swapped-eval")  # ids mean other classes
    with pytest.raises(ValueError, match=r"eval data's classes .* are not the model's .*: the same 115 ids, but "
                       r"other names or another order\. .* --vocab "):
        evaluate_checkpoint(url, _config(tiny_demo, tmp_path, f"data.eval={swapped}"))
    seven = tmp_path / "seven-eval"  # an evaluation set labelled with 7 classes of its own
    shutil.copytree(tiny_demo.eval, seven)
    manifest = json.loads((seven / "manifest.json").read_text())
    (seven / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 7}))
    write_classes(str(seven), read_classes(tiny_demo.eval, read_manifest(tiny_demo.eval))[:7])
    with pytest.raises(ValueError, match=rf"\({seven}/classes.tsv, 7 classes\) are not the model's \(.*, 115 "
                       rf"classes\): class counts differ: 7 vs 115\. An evaluation set must use the training set's "
                       rf"classes .*--vocab {tiny_demo.train}/classes.tsv"):
        evaluate_checkpoint(url, _config(tiny_demo, tmp_path, f"data.eval={seven}"))


def test_the_watching_evaluator_ends_after_the_final_checkpoint_of_a_finished_run(tiny_demo, tmp_path, caplog):
    """Started as the README's journey step 5 says (no --once, no --until-step), it ends by itself: after the
    checkpoint at train.total_steps, not before. Between polls (600 s here) a `wake` (training has ended) makes it
    look at once: with nothing new it goes on watching; with the final checkpoint there it evaluates it and ends."""
    config = _config(tiny_demo, tmp_path, "train.total_steps=2", "eval.poll_seconds=600")
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    saver.save(1, state.state_dict())
    watcher = CheckpointWatcher(config.run_dir, config, tensorboard=False)
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(watcher.run()), daemon=True)
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.watcher"):
        thread.start()
        deadline = time.monotonic() + 180
        while not read_records(watcher.reports_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        watcher.wake()  # a pass with nothing new: step 1 is not the end
        time.sleep(1.0)
        assert thread.is_alive() and "finished" not in caplog.text
        saver.save(2, state.state_dict())  # the run's last step
        watcher.wake()
        thread.join(timeout=180)  # far less than the 600 s poll
    assert not thread.is_alive(), "the evaluator kept watching a finished run, or the wake went unheard"
    assert [e.step for e in results] == [1, 2]
    assert (f"{config.run_dir} finished: its final checkpoint (step 2 = train.total_steps) is evaluated; the "
            "evaluator stops") in caplog.text
    assert CheckpointWatcher(config.run_dir, config).run() == []  # started after the end: it ends at once
    assert watcher.finished_at({1}) is None and watcher.finished_at({1, 2}) == 2


def test_watcher_stops_on_missing_eval_data_instead_of_skipping_the_checkpoint(tiny_demo, tmp_path):
    config, _ = _checkpoints(tiny_demo, tmp_path, steps=(1,))
    settings = _config(tiny_demo, tmp_path, f"data.eval={tmp_path / 'no-such-eval'}")
    with pytest.raises(StorageError, match="no-such-eval"):
        CheckpointWatcher(config.run_dir, settings).run(once=True)
    assert read_records(join_url(config.run_dir, "reports")) == []  # nothing recorded as done


def test_watcher_reports_each_checkpoint_once_and_ignores_partial_ones(tiny_demo, tmp_path):
    config, _ = _checkpoints(tiny_demo, tmp_path)
    write_bytes(join_url(config.run_dir, "checkpoints", "step-000000003", "state.pt"), b"partial: no COMMIT")
    watcher = CheckpointWatcher(config.run_dir, tensorboard=True)
    first = watcher.run(once=True)
    assert [e.step for e in first] == [1, 2]
    records = read_records(watcher.reports_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["map@100"] <= 1.0 and r["num_images"] == 80 for r in records)
    # The baselines of the eval set: computed with the first checkpoint, cached once, in every line.
    cached = json.loads(read_bytes(join_url(watcher.reports_dir, "baselines.json")))
    assert len(cached) == 1 and cached[0]["key"]["eval"] == config.data.eval
    assert records[0]["baselines"] == records[1]["baselines"] == cached[0]["baselines"]
    assert set(records[0]["baselines"]) == {"random", "prior"}
    # The decision thresholds of each evaluated checkpoint, with the eval set's class names.
    names = [c.name for c in read_classes(tiny_demo.eval, read_manifest(tiny_demo.eval))]
    for record in records:
        thresholds = read_thresholds(thresholds_url(config.run_dir, record["step"]))
        assert thresholds.step == record["step"] and thresholds.classes == names
        assert record["threshold_mean_f1_in_sample"] == pytest.approx(
            np.mean([f for f, p in zip(thresholds.f1, thresholds.positives, strict=True) if p > 0]))
        assert record["threshold_mean_f1"] == pytest.approx(  # held out: fitted on one half, scored on the other
            np.mean([f for f, p in zip(thresholds.held_out_f1, thresholds.positives, strict=True) if p > 0]))
    # A restarted evaluator finds nothing new to do.
    assert CheckpointWatcher(config.run_dir).run(once=True) == []
    assert len(read_records(watcher.reports_dir)) == 2
    html = read_bytes(join_url(watcher.reports_dir, "report.html")).decode()
    for plot in ("map_curve.png", "map_by_frequency.png", "ap_vs_frequency.png", "best_worst_classes.png",
                 "examples.png"):
        assert plot in html
        assert read_bytes(join_url(watcher.reports_dir, plot))[:4] == b"\x89PNG"
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 5 and "class prior" in html
    # The head, middle and tail thirds by training frequency, in every line, the baselines, the report, TensorBoard.
    frequency = sorted((c.train_frequency for c in read_classes(tiny_demo.train, read_manifest(tiny_demo.train))),
                       reverse=True)
    sizes = ["head_classes", "middle_classes", "tail_classes"]
    assert [records[0][size] for size in sizes] == [39, 38, 38] and tiny_demo.num_classes == 115
    assert records[0]["frequency_thirds"]["head"] == [frequency[38], frequency[0]]
    assert records[0]["frequency_thirds"]["tail"] == [frequency[-1], frequency[77]]
    for third in ("head", "middle", "tail"):
        assert 0 <= records[0][f"{third}_map@100"] <= 1 and f"{third}_map@100" in records[0]["baselines"]["prior"]
    assert ">MAP@100 by training frequency</h2>" in html
    events = EventAccumulator(str(tmp_path / "demo/tensorboard/eval"))
    events.Reload()
    tail = [e.value for e in events.Scalars("eval/tail_map@100")]
    assert tail == pytest.approx([r["tail_map@100"] for r in records])
    assert [e.value for e in events.Scalars("eval/prior_baseline/tail_map@100")] == pytest.approx(
        [r["baselines"]["prior"]["tail_map@100"] for r in records])
    assert events.Scalars("eval/head_classes")[0].value == 39


@pytest.mark.slow  # the store stopped and started again: ~20 s
def test_watcher_outlasts_an_outage_of_the_store_holding_the_run(tiny_demo, tmp_path, restartable_s3, caplog):
    server, storage = restartable_s3
    storage = storage.model_copy(update={"retries": 0, "outage_budget_s": 60.0})  # one call alone gives up at once
    config = _config(tiny_demo, "s3://restart/runs").model_copy(update={"storage": storage})
    state = build_train_state(config)
    Checkpointer(config.run_dir, config, storage).save(1, state.state_dict())
    server.stop()
    with restarted_after(server, 3.0), caplog.at_level(logging.WARNING, logger="pipeline.storage.retries"):
        evaluations = CheckpointWatcher(config.run_dir, config, tensorboard=False).run(once=True)
    assert [e.step for e in evaluations] == [1]
    assert [r["step"] for r in read_records(join_url(config.run_dir, "reports"), storage)] == [1]
    waits = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert waits and all(m.startswith(f"evaluating {config.run_dir}: ") for m in waits), waits


def test_evaluation_scores_every_eval_image_once_and_matches_a_one_shot_computation(tiny_demo, tmp_path):
    """The streamed, loader-driven MAP equals MAP computed from the full score matrix of the same model."""
    config, _ = _checkpoints(tiny_demo, tmp_path, steps=(1,))
    url = join_url(config.run_dir, "checkpoints", "step-000000001")
    evaluation = evaluate_checkpoint(url)
    model = load_weights(url, config, torch.device("cpu"))
    loader = ShardStream(tiny_demo.eval, config.data, batch_size=16, rank=0, world_size=1, train=False)
    scores, targets, ids = [], [], []
    with torch.inference_mode():
        for batch in loader:
            pixels, target = to_device(batch, "cpu", tiny_demo.num_classes)
            scores.append(model(preprocess_input(pixels))[batch.valid])
            targets.append(target[batch.valid])
            ids.append(batch.sample_ids[batch.valid])
    reference = evaluate_map_at_k(torch.cat(scores), torch.cat(targets))
    assert evaluation.result.num_images == 80 == reference.num_images
    assert abs(evaluation.result.map_at_k - reference.map_at_k) < 1e-6
    counts = ThresholdCounts(tiny_demo.num_classes, config.eval.threshold_min_positives)
    counts.add(torch.cat(scores), torch.cat(targets), torch.cat(ids))
    assert evaluation.thresholds == counts.fit() and sum(evaluation.thresholds.positives) > 80
    record = evaluation.record()
    assert json.loads(json.dumps(record))["step"] == 1


def test_evaluate_map_job_evaluates_one_named_checkpoint(tiny_demo, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    config, _ = _checkpoints(tiny_demo, tmp_path)
    spec = importlib.util.spec_from_file_location("evaluate_map", Path(__file__).parents[1] / "jobs/evaluate_map.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    url = join_url(config.run_dir, "checkpoints", "step-000000002")
    assert job.main(["--checkpoint", url, f"data.eval={tiny_demo.eval}", "eval.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "step 2: MAP@100" in out and "(class prior" in out
    assert [r["step"] for r in read_records(join_url(config.run_dir, "reports"))] == [2]
    assert job.main(["eval.k=0"]) == 2  # bad config: refused before any work
    assert "eval.k" in capsys.readouterr().err

    # --once says what it found: a typo in run.name is refused, naming the run directory and the closest run
    assert job.main(["--once", f"run.storage={tmp_path}", "run.name=dmeo"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"no run at {tmp_path}/dmeo" in captured.err
    assert "did you mean run.name=demo?" in captured.err and "run.storage" in captured.err
    assert job.main(["--checkpoint", url, f"data.eval={tiny_demo.eval}"]) == 0  # done already: says so
    assert capsys.readouterr().out == f"{url}: already evaluated (in {config.run_dir}/reports/map100.jsonl); " \
        "nothing new to evaluate\n"
    missing = join_url(config.run_dir, "checkpoints", "step-000000007")
    assert job.main(["--checkpoint", missing]) == 2 and "not a committed checkpoint" in capsys.readouterr().err
    (tmp_path / "started" / "workers").mkdir(parents=True)  # a run whose training has not checkpointed yet
    (tmp_path / "started" / "workers" / "rank-0.json").write_text("{}")
    assert job.main(["--once", f"run.storage={tmp_path}", "run.name=started"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/started: no checkpoint yet; nothing to evaluate\n"
    append_record(join_url(config.run_dir, "reports"), {**read_records(join_url(config.run_dir, "reports"))[0],
                                                        "step": 1})  # step 1 reported as well: nothing new
    assert job.main(["--once", f"run.storage={tmp_path}", "run.name=demo"]) == 0
    assert capsys.readouterr().out == (f"{config.run_dir}: all 2 committed checkpoints (steps 1, 2) are already in "
                                       f"{config.run_dir}/reports/map100.jsonl; nothing new to evaluate\n")


# Settings of an evaluator that differ from the checkpoints' saved ones; loader_workers=0 also keeps these tests fast.
EVALUATOR = ["eval.k=10", "eval.weights=raw", "eval.max_images=60", "eval.batch_size=32", "data.loader_workers=0"]


def test_resolve_config_takes_the_model_from_the_checkpoint_and_how_to_evaluate_from_the_evaluator(tiny_demo,
                                                                                                    tmp_path):
    saved = _config(tiny_demo, tmp_path, "data.loader_workers=1", "cluster.use_gpu=false")
    own = load_config("jft_xception", ["eval.k=5", "eval.class_weights=train_frequency", "storage.region=eu-west-1",
                                       "eval.resources={evaluator: 1}", "cluster.use_gpu=true",
                                       "data.loader_workers=8"])
    config = resolve_config(saved, own)
    assert config.model == saved.model and config.data.image_size == 71 and config.data.train == tiny_demo.train
    assert config.eval == own.eval and config.storage == own.storage
    assert config.cluster.use_gpu and config.data.loader_workers == 8
    assert config.data.eval == tiny_demo.eval  # the evaluator names no eval data: the checkpoint's
    other = resolve_config(saved, own.model_copy(update={"data": own.data.model_copy(update={"eval": "s3://b/e"})}))
    assert other.data.eval == "s3://b/e"
    assert resolve_config(saved, None) == saved
    assert ray_options(config) == {"num_cpus": 1, "num_gpus": 1, "resources": {"evaluator": 1.0}}


def test_evaluator_uses_its_own_eval_settings_and_records_them(tiny_demo, tmp_path, monkeypatch, caplog):
    """eval.* and data.loader_workers of the evaluator's config apply (not the checkpoint's), and each
    map100.jsonl line names k, the class weighting and the weights; the model is still the checkpoint's."""
    config, _ = _checkpoints(tiny_demo, tmp_path, steps=(1,))
    url = join_url(config.run_dir, "checkpoints", "step-000000001")
    weights = torch.arange(1, tiny_demo.num_classes + 1, dtype=torch.float64)
    weighted_eval = _with_class_weights(tiny_demo.eval, tmp_path / "weighted-eval", weights.tolist())
    loader_workers = []
    stream = evaluator.ShardStream
    monkeypatch.setattr(evaluator, "ShardStream",
                        lambda prefix, data, **kw: loader_workers.append(data.loader_workers) or stream(prefix, data,
                                                                                                       **kw))
    uniform = evaluate_checkpoint(url, load_config("demo", EVALUATOR))
    ema = evaluate_checkpoint(url, load_config("demo", [*EVALUATOR, "eval.weights=ema"]))
    weighted = load_config("demo", [*EVALUATOR, "eval.class_weights=classes_file", f"data.eval={weighted_eval}"])
    [evaluation] = CheckpointWatcher(config.run_dir, weighted, tensorboard=False).run(once=True)
    [record] = read_records(join_url(config.run_dir, "reports"))
    assert loader_workers == [0, 0, 0]
    assert (record["k"], record["class_weights"], record["weights"]) == (10, "classes_file", "raw")
    assert record["num_images"] == 60 and "map@10" in record
    ap, valid = uniform.result.per_class_ap, uniform.result.class_valid
    assert torch.equal(evaluation.result.per_class_ap, ap)  # same scores: only the mean over classes differs
    assert record["map@10"] == pytest.approx(float((weights * ap)[valid].sum() / weights[valid].sum()))
    assert abs(record["map@10"] - uniform.result.map_at_k) > 1e-3
    assert not torch.equal(ema.result.per_class_ap, ap)  # eval.weights=raw loaded other weights than the EMA ones
    # Another evaluator with other settings does not silently skip the reported step: it names it.
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.watcher"):
        assert CheckpointWatcher(config.run_dir, load_config("demo", EVALUATOR)).run(once=True) == []
    assert "already reports step(s) 1 with other eval settings" in caplog.text


def _with_class_weights(dataset, target, weights):
    """A copy of the local dataset prefix `dataset` whose classes.tsv carries `weights` in its weight column."""
    shutil.copytree(dataset, target)
    classes = read_classes(str(target), read_manifest(str(target)))
    write_classes(str(target), [dataclasses.replace(c, weight=w) for c, w in zip(classes, weights, strict=True)])
    return str(target)


def test_classes_file_weighting_needs_every_weight_and_names_the_file(tiny_demo):
    config = load_config("demo", [f"data.eval={tiny_demo.eval}", "eval.class_weights=classes_file"])
    with pytest.raises(ValueError, match=rf"{tiny_demo.eval}/classes.tsv: {tiny_demo.num_classes} of "
                                         rf"{tiny_demo.num_classes} classes have no weight"):
        class_weights(config)


@pytest.mark.parametrize(("orientation", "title"),
                         [("class", "<h1>MAP@3: 50.00%"), ("image", "<h1>MAP@3 per image: 75.00%")])
def test_report_title_is_the_headline_map_that_eval_orientation_picks(orientation, title):
    targets = torch.tensor([[1, 0], [0, 1]])
    result = evaluate_map_at_k(torch.tensor([[0.0, 1.0], [0.2, 0.5]]), targets, k=3)  # per class 1/2, per image 3/4
    config = load_config("demo", [f"eval.orientation={orientation}"])
    evaluation = evaluator.Evaluation(step=1, samples_seen=None, checkpoint="c", result=result, examples=[],
                                      seconds=0.0, config=config)
    assert title in render_html([evaluation.record()], evaluation, {})


def test_report_lines_are_idempotent_per_step(tmp_path):
    reports = str(tmp_path / "reports")
    append_record(reports, {"step": 2, "map@100": 0.5})
    append_record(reports, {"step": 1, "map@100": 0.25})
    append_record(reports, {"step": 2, "map@100": 0.75})  # a retried evaluation of step 2 adds nothing
    path = tmp_path / "reports" / "map100.jsonl"
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    with path.open("a") as stream:  # a duplicate line written behind the evaluator's back is read once
        stream.write(json.dumps({"step": 1, "map@100": 0.9}) + "\n")
    assert [(r["step"], r["map@100"]) for r in read_records(reports)] == [(1, 0.25), (2, 0.5)]


def test_watcher_names_checkpoints_retention_removed_before_they_were_evaluated(tiny_demo, tmp_path, caplog):
    config = _config(tiny_demo, tmp_path, "checkpoint.every_steps=10", "train.total_steps=45")
    for step in (30, 40, 45):  # what keep_last=3 leaves of 10, 20, 30, 40, 45: committed, already reported
        url = join_url(config.run_dir, "checkpoints", step_dir_name(step))
        write_bytes(join_url(url, "config.yaml"), config_to_yaml(config).encode())
        write_bytes(join_url(url, COMMIT), json.dumps({"step": step}).encode())
        append_record(join_url(config.run_dir, "reports"), {"step": step})
    append_record(join_url(config.run_dir, "reports"), {"step": 10})  # evaluated before retention removed it
    watcher = CheckpointWatcher(config.run_dir)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.watcher"):
        assert watcher.run(once=True) == []
        assert watcher.run(once=True) == []
    removed = [r.getMessage() for r in caplog.records if "removed by retention" in r.getMessage()]
    assert len(removed) == 1 and "steps 20 (" in removed[0], caplog.text  # named once; 10 was evaluated


class _FakeRay:
    """Stands in for the `ray` module: records `init` and the resources asked for; tasks run in this process."""

    def __init__(self):
        self.inits, self.options, self.actors = [], [], []

    def is_initialized(self):
        return bool(self.inits)

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def remote(self, **options):
        self.options.append(options)
        return lambda target: _FakeRemote(target, self)

    def get(self, refs):
        return refs


class _FakeRemote:
    def __init__(self, target, ray):
        self.target, self.ray = target, ray

    def options(self, **options):
        return self

    def remote(self, *args):
        if isinstance(self.target, type):  # an actor: its method calls are recorded, not run
            self.ray.actors.append(args)
            return type("Actor", (), {"run": type("Method", (), {"remote": staticmethod(lambda *a: a)})})()
        return self.target(*args)


@pytest.fixture
def fake_ray(monkeypatch):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


def test_background_evaluator_connects_with_the_forwarded_environment_and_asks_for_eval_resources(fake_ray,
                                                                                                   tiny_demo):
    config = load_config("demo", [f"data.eval={tiny_demo.eval}", "cluster.use_gpu=true",
                                  "eval.resources={evaluator: 1}"])
    assert start_background_evaluator(config).running == (config.train.total_steps,)
    connect_ray(config)  # what launch() does next: the connection (and its environment) stays the first one
    assert fake_ray.inits == [{"address": None, "runtime_env": {"env_vars": {"AWS_REGION": "eu-west-1"}}}]
    assert fake_ray.options == [{"num_cpus": 1, "num_gpus": 1, "resources": {"evaluator": 1.0},
                                 "concurrency_groups": {"wake": 1}}]


def test_scoring_tasks_ask_for_eval_resources_and_merge_every_image_once(fake_ray, tiny_demo, tmp_path):
    config, _ = _checkpoints(tiny_demo, tmp_path, steps=(1,))
    url = join_url(config.run_dir, "checkpoints", "step-000000001")
    settings = load_config("demo", ["data.loader_workers=0", "eval.resources={evaluator: 0.5}"])
    evaluation = evaluate_checkpoint(url, settings, workers=2)
    assert evaluation.result.num_images == 80 and evaluation.result.image_ids.tolist() == list(range(80))
    assert fake_ray.inits[0]["runtime_env"] == {"env_vars": {"AWS_REGION": "eu-west-1"}}
    assert fake_ray.options == [{"num_cpus": 1, "num_gpus": 0, "resources": {"evaluator": 0.5}}]

"""The checkpoint-watching evaluator: one report line per complete checkpoint, idempotent, never a partial one."""

import json
import re

import torch

from pipeline.config import load_config
from pipeline.data import ShardStream, to_device
from pipeline.evaluation.evaluator import evaluate_checkpoint, load_weights
from pipeline.evaluation.metrics import evaluate_map_at_k
from pipeline.evaluation.report import read_records
from pipeline.evaluation.watcher import CheckpointWatcher
from pipeline.storage import join_url, read_bytes, write_bytes
from pipeline.train.checkpoint import Checkpointer
from pipeline.train.step import build_train_state, train_step


def _checkpoints(demo, tmp_path, steps=(1, 2)):
    config = load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                  f"data.train={demo.train}", f"data.eval={demo.eval}",
                                  f"model.num_classes={demo.num_classes}", f"run.storage={tmp_path}",
                                  "train.ema_decay=0.5", "eval.batch_size=16", "checkpoint.background=false"])
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        train_step(state, config, torch.rand(4, 3, 71, 71, generator=g) * 2 - 1,
                   (torch.rand(4, demo.num_classes, generator=g) < 0.1).float())
        saver.save(step, state.state_dict())
    return config, state


def test_watcher_reports_each_checkpoint_once_and_ignores_partial_ones(tiny_demo, tmp_path):
    config, _ = _checkpoints(tiny_demo, tmp_path)
    write_bytes(join_url(config.run_dir, "checkpoints", "step-000000003", "state.pt"), b"partial: no COMMIT")
    watcher = CheckpointWatcher(config.run_dir, tensorboard=True)
    first = watcher.run(once=True)
    assert [e.step for e in first] == [1, 2]
    records = read_records(watcher.reports_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["map@100"] <= 1.0 and r["num_images"] == 80 for r in records)
    # A restarted evaluator finds nothing new to do.
    assert CheckpointWatcher(config.run_dir).run(once=True) == []
    assert len(read_records(watcher.reports_dir)) == 2
    html = read_bytes(join_url(watcher.reports_dir, "report.html")).decode()
    for plot in ("map_curve.png", "ap_vs_frequency.png", "best_worst_classes.png", "examples.png"):
        assert plot in html
        assert read_bytes(join_url(watcher.reports_dir, plot))[:4] == b"\x89PNG"
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    assert (tmp_path / "demo/tensorboard/eval").is_dir()


def test_evaluation_scores_every_eval_image_once_and_matches_a_one_shot_computation(tiny_demo, tmp_path):
    """The streamed, loader-driven MAP equals MAP computed from the full score matrix of the same model."""
    config, _ = _checkpoints(tiny_demo, tmp_path, steps=(1,))
    url = join_url(config.run_dir, "checkpoints", "step-000000001")
    evaluation = evaluate_checkpoint(url)
    model = load_weights(url, config, "ema", None, torch.device("cpu"))
    loader = ShardStream(tiny_demo.eval, config.data, batch_size=16, rank=0, world_size=1, train=False)
    scores, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            images, target = to_device(batch, "cpu", tiny_demo.num_classes)
            scores.append(model(images)[batch.valid])
            targets.append(target[batch.valid])
    reference = evaluate_map_at_k(torch.cat(scores), torch.cat(targets))
    assert evaluation.result.num_images == 80 == reference.num_images
    assert abs(evaluation.result.map_at_k - reference.map_at_k) < 1e-6
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
    assert "step 2: MAP@100" in capsys.readouterr().out
    assert [r["step"] for r in read_records(join_url(config.run_dir, "reports"))] == [2]
    assert job.main(["eval.k=0"]) == 2  # bad config: refused before any work

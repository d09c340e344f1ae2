"""Experiment tracking: a real MLflow server (SQLite store) and W&B offline runs receive training's config and scalars,
the evaluator's MAP@100 and report, in one tracked run that a resume continues; a tracker that fails never stops
training."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
import zlib
from pathlib import Path

import pytest
from test_checkpoint import tiny_config

from pipeline.config import load_config
from pipeline.evaluation.report import read_records
from pipeline.evaluation.watcher import CheckpointWatcher
from pipeline.storage import join_url, read_bytes
from pipeline.tracking import TRACKING_FILE, Tracker, TrackingUnavailable, metric_name, read_run_file, start_tracking
from pipeline.tracking.tracker import MAX_PENDING, BackgroundTracker
from pipeline.train.loop import train

SERVER_START_S = 180  # the server imports MLflow, FastAPI and Flask: slow on 2 busy cores


def flatten(raw: dict, prefix: str = "") -> dict[str, str]:
    """The test's own reference for what MLflow's params must be: dotted keys, strings as such, else JSON."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def evaluator_settings(demo) -> object:
    """The evaluator's own config, as `jobs/evaluate_map.py --config demo` builds it: no tracking settings, so it
    reports into the tracked run that training's saved config names."""
    return load_config("demo", ["data.loader_workers=1", f"data.eval={demo.eval}"])


def train_evaluate_resume(demo, run_storage, *tracking):
    """4 steps (checkpoints 2, 4), evaluate both, resume to 7 steps: the first config and both final records."""
    first = tiny_config(demo, run_storage, "train.total_steps=4", "checkpoint.every_steps=2", *tracking)
    first_record = train(first)
    evaluated = CheckpointWatcher(first.run_dir, evaluator_settings(demo), tensorboard=False).run(once=True)
    assert [e.step for e in evaluated] == [2, 4]
    second = tiny_config(demo, run_storage, "train.total_steps=7", "checkpoint.every_steps=2", *tracking)
    return first, first_record, train(second)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite store and artifacts under tmp_path; its URI. Stopped by its PID
    (its process group: the server starts a uvicorn worker)."""
    port, folder = _free_port(), tmp_path / "mlflow-server"
    folder.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    log_file = open(folder / "server.log", "wb")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(server, uri, folder / "server.log")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


def _wait_until_healthy(server: subprocess.Popen, uri: str, log_path: Path) -> None:
    for _ in range(SERVER_START_S * 2):
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        threading.Event().wait(0.5)
    raise RuntimeError(f"mlflow server did not answer within {SERVER_START_S}s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_run_holds_config_training_scalars_evaluation_and_report_and_a_resume_continues_it(
        tiny_demo, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    tracking = ["tracking.backend=mlflow", f"tracking.uri={mlflow_server}", "tracking.project=tests",
                "tracking.tags={team: vision}"]
    first, first_record, second_record = train_evaluate_resume(tiny_demo, tmp_path, *tracking)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tests")
    [run] = client.search_runs([experiment.experiment_id])  # one tracked run for training, evaluation and resume
    assert read_run_file(first.run_dir)["mlflow"] == {"run_id": run.info.run_id,
                                                      "experiment_id": experiment.experiment_id}
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    # Params are the first config; the resume's changed value is a tag (MLflow never changes a param).
    assert run.data.params == flatten(first.model_dump(mode="json"))
    assert run.data.params["train.total_steps"] == "4" and run.data.tags["config.train.total_steps"] == "7"
    assert run.data.tags["team"] == "vision" and run.data.tags["run_dir"] == first.run_dir

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    # Training's records every train.log_every=2 steps and at the end, continuing after the resume.
    for key in ("loss", "lr", "samples_per_s", "grad_norm", "data_wait_fraction"):
        assert sorted(history(key)) == [2, 4, 6, 7], key
    assert history("loss")[4] == pytest.approx(first_record["loss"])
    assert history("loss")[7] == pytest.approx(second_record["loss"])
    assert history("lr")[7] == pytest.approx(second_record["lr"])
    assert all(value > 0 for value in history("samples_per_s").values())

    # The evaluator's metrics at the checkpoints' training steps, equal to its map100.jsonl lines.
    records = read_records(join_url(first.run_dir, "reports"))
    for name in ("map@100", "image_map@100", "precision@1", "head_map@100", "tail_map@100", "tail_classes"):
        key = "eval/" + name.replace("@", "_at_")
        assert history(key) == {r["step"]: pytest.approx(r[name]) for r in records}, key
    for name in ("map@100", "tail_map@100"):
        prior = history("eval/prior_baseline/" + name.replace("@", "_at_"))
        assert prior == {r["step"]: pytest.approx(r["baselines"]["prior"][name]) for r in records}
    assert history("eval/samples_seen") == {2: 16, 4: 32}

    # The report is the run's artifact, byte for byte.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/report.html"]
    downloaded = client.download_artifacts(run.info.run_id, "reports/report.html", str(tmp_path))
    assert Path(downloaded).read_bytes() == read_bytes(join_url(first.run_dir, "reports", "report.html"))

    # A tracked run deleted on the server is replaced by a new one, recorded in tracking.json.
    client.delete_run(run.info.run_id)
    tracker = start_tracking(first.run_dir, first, role="train")
    tracker.log_scalars(8, {"loss": 0.5})
    tracker.close()
    replacement = read_run_file(first.run_dir)["mlflow"]["run_id"]
    assert replacement != run.info.run_id
    assert {m.step: m.value for m in client.get_metric_history(replacement, "loss")} == {8: 0.5}


def read_wandb_records(path: Path) -> list:
    """The records of a W&B `.wandb` file: LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header
    of CRC-32, length and type) after a 7-byte `:W&B` header, each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block, position = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad chunk at {position}"
        position += 7 + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _wandb_run(folder: Path) -> dict:
    """What an offline run directory holds: history rows, the config (top-level keys, as updated), files, exit."""
    [log_file] = folder.glob("run-*.wandb")
    run = {"history": [], "config": {}, "files": set(), "exit_code": None, "id": None}
    for record in read_wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "files":
            run["files"].update(f.path for f in record.files.files)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def test_wandb_offline_runs_hold_config_training_scalars_evaluation_and_report_under_one_id(
        tiny_demo, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    try:
        first, first_record, second_record = train_evaluate_resume(
            tiny_demo, tmp_path / "runs", "tracking.backend=wandb", "tracking.project=tests")
    finally:
        wandb.teardown()

    run_id = read_run_file(first.run_dir)["wandb"]["run_id"]
    folders = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [run_id] * 3  # training, evaluator, resumed training
    training, evaluator, resumed = (_wandb_run(f) for f in folders)
    assert training["id"] == evaluator["id"] == resumed["id"] == run_id

    def series(run, key):
        return {row["step"]: row[key] for row in run["history"] if key in row}

    assert sorted(series(training, "loss")) == [2, 4]
    assert series(training, "loss")[4] == pytest.approx(first_record["loss"])
    assert sorted(series(resumed, "loss")) == [6, 7]
    assert series(resumed, "loss")[7] == pytest.approx(second_record["loss"])
    assert sorted(series(resumed, "samples_per_s")) == [6, 7]
    assert training["config"]["train"]["total_steps"] == 4 and resumed["config"]["train"]["total_steps"] == 7
    assert training["config"]["model"] == first.model_dump(mode="json")["model"]
    assert training["exit_code"] == resumed["exit_code"] == 0

    records = read_records(join_url(first.run_dir, "reports"))
    assert series(evaluator, "eval/map_at_100") == {r["step"]: pytest.approx(r["map@100"]) for r in records}
    assert series(evaluator, "eval/image_map_at_100") == {r["step"]: pytest.approx(r["image_map@100"])
                                                          for r in records}
    # Every number of each map100.jsonl line is in the tracked run at its step (threshold_mean_f1 was not).
    assert series(evaluator, "eval/threshold_mean_f1") == {r["step"]: pytest.approx(r["threshold_mean_f1"])
                                                           for r in records}
    for record in records:
        measured = {name for name, value in record.items() if isinstance(value, float)} - {"time"}
        row = next(row for row in evaluator["history"] if row["step"] == record["step"] and "eval/map_at_100" in row)
        assert {metric_name(f"eval/{name}") for name in measured} <= set(row), measured
    assert "reports/report.html" in evaluator["files"]
    saved = folders[1] / "files" / "reports" / "report.html"
    assert saved.read_bytes() == read_bytes(join_url(first.run_dir, "reports", "report.html"))


class _Hanging:
    """A backend whose service never answers: `open` blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def open(self, known):
        self.release.wait()
        return {"run_id": "hanging"}

    def log_scalars(self, step, scalars):
        self.calls.append(f"scalars {step}")

    def log_config(self, config):
        self.calls.append("config")

    def log_file(self, path, name):
        self.calls.append(name)

    def close(self, failed):
        self.calls.append(f"close failed={failed}")


class _Refusing(_Hanging):
    def open(self, known):
        return {"run_id": "refusing"}

    def log_scalars(self, step, scalars):
        raise ConnectionError(f"refused at step {step}")


def test_a_hanging_tracker_never_blocks_the_caller_and_closing_gives_up_after_its_timeout(tmp_path, caplog):
    backend = _Hanging()
    tracker = BackgroundTracker(backend, "mlflow", str(tmp_path), None, close_timeout_s=0.5)
    for step in range(1, 11):  # the sender is stuck in open(): the calls return at once, queued
        tracker.log_scalars(step, {"loss": 1.0})
    with caplog.at_level(logging.WARNING):
        tracker.close()
    assert "still queued after tracking.close_timeout_s=0.5s" in caplog.text
    backend.release.set()  # the service answers at last: the queued calls go out, in order, then the close
    assert tracker._sender.close(30)  # closing again waits again
    assert backend.calls == [f"scalars {step}" for step in range(1, 11)] + ["close failed=False"]
    assert json.loads((tmp_path / TRACKING_FILE).read_text()) == {"mlflow": {"run_id": "hanging"}}


def test_calls_beyond_the_queue_are_dropped_and_counted(tmp_path):
    backend = _Hanging()
    tracker = BackgroundTracker(backend, "mlflow", str(tmp_path), None, close_timeout_s=30)
    for step in range(1, MAX_PENDING + 101):
        tracker.log_scalars(step, {"loss": 1.0})
    assert tracker.problems in (99, 100)  # the sender holds the first call (99) or has not taken it yet (100)
    backend.release.set()
    tracker.close()
    assert len(backend.calls) == MAX_PENDING + 100 - tracker.problems + 1 and backend.calls[-1].startswith("close")


def test_failing_log_calls_are_warned_about_once_a_minute_not_raised(tmp_path, caplog):
    backend = _Refusing()
    tracker = BackgroundTracker(backend, "wandb", str(tmp_path), None, close_timeout_s=30)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.tracker"):
        for step in (1, 2, 3):
            tracker.log_scalars(step, {"loss": 1.0, "note": "text is left out", "missing": None})
        tracker.log_artifact(b"<html></html>", "reports/report.html")
        tracker.close(failed=True)
    assert tracker.problems == 3
    [warning] = [r.getMessage() for r in caplog.records]
    assert "scalars at step 1 failed: ConnectionError: refused at step 1; training goes on" in warning
    assert backend.calls == ["reports/report.html", "close failed=True"]


def test_unreachable_mlflow_server_costs_training_nothing(tiny_demo, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = tiny_config(tiny_demo, tmp_path, "train.total_steps=2", "checkpoint.every_steps=2",
                         "tracking.backend=mlflow", f"tracking.uri=http://127.0.0.1:{_free_port()}",
                         "tracking.close_timeout_s=20")
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.tracker"):
        assert train(config)["step"] == 2
    assert "tracking (mlflow)" in caplog.text and "failed" in caplog.text
    assert read_run_file(config.run_dir) == {}  # no tracked run was opened, so none is recorded


def test_tracking_none_is_a_no_op_tracker(tmp_path):
    tracker = start_tracking(str(tmp_path), load_config("demo"), role="train")
    assert type(tracker) is Tracker
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / TRACKING_FILE).exists()


def test_a_missing_tracking_package_is_refused_before_training_starts(tiny_demo, tmp_path, monkeypatch):
    from pipeline.train.launcher import preflight

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    config = tiny_config(tiny_demo, tmp_path, "tracking.backend=wandb")
    with pytest.raises(TrackingUnavailable, match=r"tracking.backend=wandb needs the wandb package: pip install"):
        preflight(config)


def test_the_evaluator_reports_where_training_tracked_unless_it_names_a_backend_itself(tiny_demo, tmp_path):
    from pipeline.evaluation.evaluator import resolve_config

    saved = tiny_config(tiny_demo, tmp_path, "tracking.backend=mlflow", "tracking.uri=http://tracker:5000")
    inherited = resolve_config(saved, evaluator_settings(tiny_demo)).tracking
    assert inherited == saved.tracking
    own = load_config("demo", ["tracking.backend=wandb", "tracking.project=evals"])
    assert resolve_config(saved, own).tracking == own.tracking

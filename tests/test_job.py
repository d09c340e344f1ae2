"""The real job path: `ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python
jobs/train_multilabel.py ...`, with Ray's token authentication left on (as users run it)."""

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_clean_exit import survivors

pytestmark = pytest.mark.slow  # `ray start` + `ray job submit`

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concurrently(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands at the same time; their results, in order."""
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: subprocess.run(command, capture_output=True, text=True, env=env,
                                                            timeout=300), commands))


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "jobs/train_multilabel.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "optimizer.epsilon = 1.0" in out and "data.demo.variant" in out and "cluster.max_failures = 3" in out


def test_bad_config_and_impossible_launches_are_refused_before_any_cluster_work(tiny_demo):
    # RAY_ADDRESS names a port where no cluster listens: reaching for it would fail differently (a traceback)
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}
    job = [sys.executable, str(ROOT / "jobs/train_multilabel.py")]
    data = [f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}"]
    cases = [
        (["optimizer.nme=sgd"], "unknown config key 'optimizer.nme'"),
        ([*data, "model.num_classes=7"], f"set model.num_classes={tiny_demo.num_classes}"),
        ([*data, f"model.num_classes={tiny_demo.num_classes}", "cluster.num_workers=4", "data.loader_workers=3"],
         "ShardSplitError: the dataset has 8 non-empty shards"),
    ]
    # The jobs run side by side: each spends its seconds importing, on one core.
    for run, (_, message) in zip(concurrently([[*job, *overrides] for overrides, _ in cases], env), cases,
                                 strict=True):
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr


def test_init_weights_that_do_not_fit_the_model_are_refused_before_any_worker_starts(tiny_demo, tmp_path):
    """Full-width weights (the paper's model, as Keras and timm files are) and a checkpoint of another width, each
    given to the tiny model: one line naming the first mismatching tensor and both shapes, exit 2, no Ray (the
    address is a dead port), instead of Ray retrying the workers' error 3 times."""
    import torch
    from test_init_from import timm_layout_state

    from pipeline.checkpoint.checkpointer import Checkpointer
    from pipeline.config import load_config
    from pipeline.train.step import build_train_state

    full_width = tmp_path / "legacy_xception.pth"
    torch.save(timm_layout_state(tiny_demo.num_classes), full_width)
    data = [f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}",
            f"model.num_classes={tiny_demo.num_classes}", "model.middle_blocks=1", "data.image_size=71",
            "checkpoint.background=false"]
    wider = load_config("demo", [*data, "model.width_multiplier=0.5", f"run.storage={tmp_path / 'runs'}",
                                 "run.name=wider"])
    Checkpointer(wider.run_dir, wider).save(1, build_train_state(wider).state_dict())
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}
    sources = [(full_width, (32, 3, 3, 3)), (wider.run_dir, (16, 3, 3, 3))]
    runs = concurrently([[sys.executable, str(ROOT / "jobs/train_multilabel.py"), *data, "model.width_multiplier=0.125",
                          f"run.storage={tmp_path / 'runs'}", "run.name=tiny", f"model.init_from={source}"]
                         for source, _ in sources], env)
    for run, (_, there) in zip(runs, sources, strict=True):
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ValueError: model.init_from="), run.stderr
        assert f"tensor 'entry_flow.conv1.weight' has shape {there} there, (8, 3, 3, 3) in this model" in run.stderr
        print(f"refused: {run.stderr.strip()}")


def test_ctrl_c_on_the_training_job_prints_interrupted_and_exits_130(tiny_demo, tmp_path):
    """The job run in a terminal (its own local Ray cluster) gets Ctrl-C, i.e. SIGINT to its whole process group,
    while it trains: Ray Train aborts the run, and the job ends with the one line `interrupted`, exit code 130, no
    traceback of its own (it exited 1 with no summary: Ray's handler exits, which `ray.get` reports as exit 1), and
    none of its processes outlives it."""
    command = [sys.executable, str(ROOT / "jobs/train_multilabel.py"), "--no-eval", "cluster.address=local",
               "cluster.num_workers=1", "model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
               "data.loader_workers=1", f"data.train={tiny_demo.train}", "data.eval=null",
               f"model.num_classes={tiny_demo.num_classes}", "train.global_batch_size=8", "train.total_steps=100000",
               "train.log_every=2", "checkpoint.every_steps=10", f"run.storage={tmp_path / 'runs'}", "run.name=ctrl-c"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        job = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "step 6/" not in err.read_text():
            assert job.poll() is None and time.monotonic() < deadline, err.read_text()[-4000:]
            time.sleep(0.5)
        descendants = psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = job.wait(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    own = [line for line in err.read_text().splitlines() if line.strip() and "pid=" not in line]  # not a worker's
    assert code == 130, err.read_text()[-4000:]
    assert own[-1] == "interrupted" and not [line for line in own if "Traceback" in line], own[-30:]
    assert "training finished" not in out.read_text()
    assert survivors(descendants, within_s=60) == []


def test_ray_job_submit_runs_the_training_job(tiny_demo, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    port, dashboard = _free_port(), _free_port()
    # Token auth stays on; a per-test token (instead of ~/.ray/auth_token) for both the head and the client.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # as an activated venv
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited: {head.stdout.read()[-2000:]}")
            time.sleep(2)
        else:
            pytest.fail(f"the Ray dashboard at {address} did not come up: {probe.stderr[-2000:]}")
        overrides = ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                     "data.loader_workers=1", f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}",
                     f"model.num_classes={tiny_demo.num_classes}", "train.global_batch_size=8",
                     "train.total_steps=4", "train.log_every=2", "checkpoint.every_steps=4",
                     f"run.storage={tmp_path / 'runs'}", "run.name=job", "eval.with_training=true",
                     # The evaluator beside training polls every 600 s: only the job's wake at the end of training
                     # lets it report the final checkpoint within the submit's timeout.
                     "eval.poll_seconds=600"]
        for _ in range(30):
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "jobs/train_multilabel.py", "--config", "demo", *overrides],
                env=env, capture_output=True, text=True, timeout=420)
            logs = submit.stdout + submit.stderr
            # The dashboard answers before the head's job agent is up (seen on a loaded machine): Ray refuses
            # the submission, creating no job, and says to try again later.
            if "No available agent to submit job" not in logs:
                break
            time.sleep(2)
        assert submit.returncode == 0, logs[-4000:]
        assert "step 2/4" in logs and "step 4/4" in logs, logs[-4000:]
        assert "training finished at step 4" in logs and "MAP@100" in logs, logs[-4000:]
        assert (tmp_path / "runs/job/reports/report.html").exists()
    finally:
        if head.poll() is None:
            # Everything we started is killed at once: the session (start_new_session: its group is head.pid) and,
            # by pid, each process recorded as its descendant (a Ray worker such as the TrainController actor can
            # sit in a process group of its own: once in CI it outlived the group's kill by 30 s). An orderly
            # `ray stop` took 33 s here and is no part of what this test checks; nothing may outlive the test.
            daemons = psutil.Process(head.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            for daemon in daemons:
                with contextlib.suppress(psutil.NoSuchProcess):
                    daemon.kill()
            head.wait(timeout=30)
            assert survivors(daemons, within_s=30) == []
        shutil.rmtree(ray_tmp, ignore_errors=True)

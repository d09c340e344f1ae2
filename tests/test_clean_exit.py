"""A job stopped while it works leaves no process behind: the evaluator killed while scoring, as an operator would."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.config import ShardsConfig, load_config
from pipeline.data.demo import write_demo_shards
from pipeline.data.format import read_classes, read_manifest
from pipeline.train.step import build_train_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scoring_run(tmp_path_factory: pytest.TempPathFactory, tiny_demo) -> tuple[Path, str]:
    """A run with one checkpoint of a small model, and an eval set of 1,000 images (scoring takes a while)."""
    root = tmp_path_factory.mktemp("scoring-run")
    evaluation = str(root / "eval")
    write_demo_shards("tiny", "eval", 1000, 1, evaluation, image_size=80,
                      options=ShardsConfig(samples_per_shard=100, workers=1, progress=False),
                      vocabulary=read_classes(tiny_demo.train, read_manifest(tiny_demo.train)))
    config = load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                  f"data.train={tiny_demo.train}", f"data.eval={evaluation}",
                                  f"model.num_classes={tiny_demo.num_classes}", f"run.storage={root / 'runs'}",
                                  "checkpoint.background=false"])
    Checkpointer(config.run_dir, config).save(1, build_train_state(config).state_dict())
    return root, evaluation


def evaluator_killed_while_scoring(root: Path, evaluation: str,
                                   sig: signal.Signals) -> tuple[int, list[psutil.Process], str, str]:
    """Start `jobs/evaluate_map.py --once`, send `sig` once its DataLoader workers are scoring; its exit code, the
    descendants it had just before the signal and their command lines, and its log."""
    log = root / f"evaluator-{sig.name}.log"
    command = [sys.executable, str(REPO / "jobs/evaluate_map.py"), "--once", f"run.storage={root / 'runs'}",
               "run.name=demo", f"data.eval={evaluation}", "data.loader_workers=2", "eval.batch_size=16"]
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        process = psutil.Process(job.pid)
        deadline = time.monotonic() + 300
        # resource tracker + fork server + 2 DataLoader workers (children of the fork server): scoring has started
        while len(descendants := process.children(recursive=True)) < 4:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        kinds = " ".join(" ".join(p.cmdline()) for p in descendants)
        job.send_signal(sig)
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    return code, descendants, kinds, log.read_text()


def running_fork_processes(processes: list[psutil.Process]) -> list[int]:
    """The PIDs of `processes` started from the fork server (the server itself and its workers: their command line
    names forkserver) that still run (a zombie has ended)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "forkserver" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process.pid)
    return running


def survivors(processes: list[psutil.Process], within_s: float = 20.0) -> list[str]:
    """Those of `processes` still running after `within_s` seconds (then killed, so no test leaves them behind)."""
    gone, alive = psutil.wait_procs(processes, timeout=within_s)
    del gone
    names = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(" ".join(p.cmdline())[:120])
            p.kill()
    return names


def job_tracebacks(log: str) -> list[str]:
    """The tracebacks in `log` other than a worker's failed start: a DataLoader worker that the fork server was
    starting at the moment the job stopped can fail to read its start-up data from the closed pipe, and Python's
    fork server prints that (in `multiprocessing/forkserver.py`, before any of our code runs; seen once in CI)."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return [block for block in blocks if "multiprocessing/forkserver.py" not in block.split("\n", 2)[1]]


@pytest.mark.slow  # two evaluator processes started and killed: ~30-60 s
def test_the_evaluator_killed_while_scoring_leaves_no_process_behind(scoring_run: tuple[Path, str]) -> None:
    root, evaluation = scoring_run
    code, descendants, kinds, log = evaluator_killed_while_scoring(root, evaluation, signal.SIGTERM)
    assert "forkserver" in kinds and "resource_tracker" in kinds
    assert code == 143, log  # an orderly stop, reported as a SIGTERM'd process's code
    # When the job has exited its fork server has too (ended and reaped by the job): it outlived the job as an orphan
    # for 0.5 s here, ~8 s on a loaded machine. Its workers were shut down before, in the unwinding.
    assert running_fork_processes(descendants) == []
    assert "SIGTERM received: stopping" in log and job_tracebacks(log) == [], log
    assert survivors(descendants) == []

    # SIGKILL cannot be handled: the DataLoader workers notice the main process is gone and end, then the fork
    # server and the resource tracker do (before, the workers and the fork server kept each other alive forever).
    code, descendants, _, log = evaluator_killed_while_scoring(root, evaluation, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert survivors(descendants) == []


JOB_ON_RAY = """
import sys, time
from pipeline.cli import job_main
from pipeline.cluster import connect_ray
from pipeline.config import load_config

@job_main
def main(argv):
    connect_ray(load_config("demo", ["cluster.num_workers=1"]))  # a new local Ray, as a job with no cluster gets
    print("connected", flush=True)
    time.sleep(120)
    return 0

sys.exit(main([]))
"""


@pytest.mark.slow  # starts a local Ray: ~10 s
def test_a_job_connected_to_ray_still_stops_in_order_on_sigterm(tmp_path):
    """`ray.init` installs Ray's SIGTERM handler (exit at once, after a C++ stack dump, as `ray job stop` showed);
    the job's own comes back after it: one line, exit code 143."""
    job = subprocess.Popen([sys.executable, "-c", JOB_ON_RAY], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        before = []
        while (line := job.stdout.readline()) and line.strip() != "connected":
            before.append(line)
        assert line, "".join(before)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            job.kill()
    assert job.returncode == 143, output
    assert "SIGTERM received: stopping" in output
    assert "SIGTERM received at time" not in output and "Traceback" not in output, output


@pytest.mark.slow  # an evaluator process started and interrupted: ~20-30 s
def test_ctrl_c_on_a_job_prints_interrupted_exits_130_and_leaves_no_process_behind(
    scoring_run: tuple[Path, str],
) -> None:
    root, evaluation = scoring_run
    code, descendants, _, log = evaluator_killed_while_scoring(root, evaluation, signal.SIGINT)
    assert code == 130, log
    # the one summary line (a loader worker the fork server was starting may print its failed start after it)
    assert log.splitlines().count("interrupted") == 1 and job_tracebacks(log) == [], log
    assert survivors(descendants) == []

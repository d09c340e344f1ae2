"""The GPU acceptance run (`tests/benchmarks/gpu_acceptance.py`) rehearsed: its dry run, every part at toy size on
the CPU, must finish and write a report whose figures are real, so that the script works when a GPU is lent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "benchmarks" / "gpu_acceptance.py"
PARTS = ("a", "b", "c", "d", "e")

pytestmark = pytest.mark.slow  # 20-35 s on 2 cores: five part processes, a training loop, a learning run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The dry run's JSON report, with its printed output under "stdout"."""
    out = tmp_path_factory.mktemp("gpu-acceptance") / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's pipeline, whichever one is installed
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {**json.loads(out.read_text()), "stdout": done.stdout}


def measured(report: dict, part: str) -> list[dict]:
    return [r for r in report["parts"][part]["rows"] if "figure" in r]


def test_every_part_runs_and_measures(dry_run: dict) -> None:
    assert dry_run["dry_run"] is True
    assert list(dry_run["parts"]) == list(PARTS)
    for part in PARTS:
        rows = dry_run["parts"][part]["rows"]
        assert not [r for r in rows if "error" in r], rows
        assert measured(dry_run, part), f"part ({part}) measured nothing"
        # The one thing a CPU may lack is a GPU JPEG decoder; anything else skipped would be a part not rehearsed.
        for r in rows:
            if "skipped" in r:
                assert r["what"] == "GPU JPEG decode" and "importable" in r["skipped"], r


def test_figures_are_finite_and_each_has_its_peer(dry_run: dict) -> None:
    for part in PARTS:
        for r in measured(dry_run, part):
            counts = r["unit"] == "syncs"  # a plain step may well sync zero times
            for value in (r["figure"], r["peer_figure"]):
                assert value is not None and math.isfinite(value), r
                assert value >= 0 if counts else value > 0, r
            assert r["peer"], r


def test_the_step_variants_and_their_peers(dry_run: dict) -> None:
    whats = {r["what"] for r in measured(dry_run, "a")}
    for batch in (2, 4):
        for variant in ("fp32", "bf16 autocast", "fp32 channels_last", "bf16 channels_last",
                        "bf16 channels_last compile", "bf16 channels_last compile max-autotune"):
            assert f"train step b{batch}: {variant}" in whats
    peers = {r["peer"] for r in measured(dry_run, "a")}
    assert {"plain fp32 b2", "plain bf16 channels_last b4"} <= peers  # the plain PyTorch loop was measured


def test_what_the_parts_find(dry_run: dict) -> None:
    loop = {r["what"].split(",")[0]: r for r in measured(dry_run, "b")}
    assert 0 <= loop["data wait in the loop b4"]["figure"] <= 100
    syncs = {r["what"]: r for r in measured(dry_run, "c")}
    step = syncs["host syncs per step, pipeline train_step, b2"]
    assert step["figure"] >= 3 > step["peer_figure"]  # loss, mask count, gradient norm: read every step
    assert any(w.startswith("stop agreement per step, 2 ranks") for w in syncs)
    for r in measured(dry_run, "d"):  # the device path computes the CPU path's MAP
        assert r["map"][0] == pytest.approx(r["map"][1], abs=1e-9), r
    curve = dry_run["parts"]["e"]
    assert [p["step"] for p in curve["details"]["points"]] == [2, 4]
    assert set(curve["details"]["baselines"]) == {"prior", "random"}


def test_one_table_is_printed(dry_run: dict) -> None:
    assert dry_run["table"] in dry_run["stdout"]
    for part in PARTS:
        assert f"\n| {part} | " in dry_run["table"]

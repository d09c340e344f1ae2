"""Checkpoint save/restore of the `jft_xception_fc` training state (115.6M parameters + EMA + RMSprop state) to the
embedded S3, synchronous vs background, against the raw S3 bandwidth measured in the same run.

"Stall" is how long `Checkpointer.save()` blocks the training loop; a simulated training step (a matmul loop of
about --step-seconds) runs while a background upload is in flight, so the table also shows how much the upload
slows training down on this machine. Prints a table and writes JSON.

    python tests/benchmarks/checkpoint_io.py --out benchmark-results/checkpoint_io.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.format import read_checkpoint
from pipeline.config import load_config
from pipeline.models import count_parameters
from pipeline.storage import read_bytes, write_bytes
from pipeline.storage.local_s3 import LocalS3
from pipeline.train.step import build_train_state


def fake_step(seconds: float) -> int:
    """Busy work standing in for training steps: returns how many 'steps' ran in `seconds`."""
    a = torch.randn(512, 512)
    steps, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jft_xception_fc")
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--out", default="benchmark-results/checkpoint_io.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, LocalS3(Path(tmp) / "s3", buckets=["bench"]) as s3:
        os.environ.update(s3.env())  # the local server's keys, as a user's shell would export them
        storage = s3.storage_config()
        config = load_config(args.preset, ["run.storage=s3://bench/runs", f"storage.endpoint_url={s3.endpoint_url}",
                                           f"storage.region={storage.region}"])
        storage = config.storage
        state = build_train_state(config)
        # Give the optimizer its state (mean square, momentum) as after the first step.
        for p in state.model.parameters():
            p.grad = torch.zeros_like(p)
        state.optimizer.step()
        params = count_parameters(state.model)
        tensor_bytes = sum(t.numel() * t.element_size() for t in _tensors(state.state_dict()))

        blob = torch.empty(tensor_bytes // 4, dtype=torch.float32).numpy().tobytes()
        start = time.perf_counter()
        write_bytes("s3://bench/raw/blob", blob, storage)
        raw_write = time.perf_counter() - start
        start = time.perf_counter()
        read_bytes("s3://bench/raw/blob", storage)
        raw_read = time.perf_counter() - start
        del blob

        baseline_steps = fake_step(args.step_seconds)
        rows = {}
        for mode in ("synchronous", "background"):
            run_config = config.model_copy(update={
                "checkpoint": config.checkpoint.model_copy(update={"background": mode == "background"}),
                "run": config.run.model_copy(update={"name": mode})})
            saver = Checkpointer(run_config.run_dir, run_config, storage)
            start = time.perf_counter()
            saver.save(1, state.state_dict(), {"ranks": []})
            stall = time.perf_counter() - start
            steps = fake_step(args.step_seconds) if mode == "background" else None
            saver.wait()
            total = time.perf_counter() - start
            start = time.perf_counter()
            restored = read_checkpoint(saver.latest().url, storage)
            restore = time.perf_counter() - start
            assert restored["state"]["counters"]["step"] == state.step
            rows[mode] = {"stall_s": stall, "save_total_s": total, "upload_s": saver.last_upload_s,
                          "restore_s": restore,
                          "training_speed_during_upload": (steps / baseline_steps) if steps is not None else None}

    gb = tensor_bytes / 1e9
    print(f"\n{args.preset}: {params / 1e6:.1f}M parameters; state (model + EMA + optimizer) {gb:.2f} GB")
    print(f"raw S3 (embedded SeaweedFS, 127.0.0.1): write {gb / raw_write:.2f} GB/s ({raw_write:.1f}s), "
          f"read {gb / raw_read:.2f} GB/s ({raw_read:.1f}s)")
    header = f"{'mode':<12} {'stall s':>8} {'save s':>8} {'GB/s':>6} {'restore s':>10}"
    print(f"{header} {'training speed during upload':>30}")
    for mode, r in rows.items():
        speed = f"{r['training_speed_during_upload']:.0%}" if r["training_speed_during_upload"] else "n/a (blocked)"
        print(f"{mode:<12} {r['stall_s']:>8.2f} {r['save_total_s']:>8.2f} {gb / r['save_total_s']:>6.2f} "
              f"{r['restore_s']:>10.2f} {speed:>30}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "parameters": params, "state_bytes": tensor_bytes,
                               "raw_write_s": raw_write, "raw_read_s": raw_read, "modes": rows}, indent=1))
    print(f"wrote {out}")


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


if __name__ == "__main__":
    main()

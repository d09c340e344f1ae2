"""Images/s of a full-size Xception training step (299x299) for each precision/layout/compile variant.

Compares fp32 eager, bf16 autocast, channels_last and torch.compile on this machine, with the model's FLOPs and the
achieved fraction of the machine's measured matmul rate (fp32 or bf16, whichever the variant computes in).
A variant counts as correct when it starts from fp32 eager's loss (same weights and batch) and its loss falls.
The fastest correct variant should be the CPU default (`train.precision`, `train.channels_last`,
`train.compile`). Prints a table and writes JSON.

    python tests/benchmarks/train_step.py --batch-size 8 --steps 3 --out benchmark-results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.models import xception_macs
from pipeline.train.step import build_train_state, train_step

VARIANTS = {
    "fp32 eager": [],
    "bf16 autocast": ["train.precision=bf16"],
    "fp32 channels_last": ["train.channels_last=true"],
    "bf16 channels_last": ["train.precision=bf16", "train.channels_last=true"],
    "fp32 compile": ["train.compile=true"],
    "bf16 compile": ["train.precision=bf16", "train.compile=true"],
    "bf16 channels_last compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
}


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s: the ceiling a conv net can approach on this machine."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def correct(result: dict, reference: dict) -> bool:
    """Trains like fp32 eager: the same first loss (same initial weights and batch; bf16 within 2%), and the
    loss falls over the timed steps (the batch is fixed, so a working optimizer step must lower it)."""
    tolerance = 0.02 if result["bf16"] else 1e-3
    same_start = abs(result["loss_first"] - reference["loss_first"]) <= tolerance * abs(reference["loss_first"])
    return same_start and result["loss_last"] < result["loss_first"]


def run_variant(overrides: list[str], batch_size: int, steps: int, device: torch.device) -> dict:
    config = load_config("jft_xception", ["model.num_classes=1000", f"train.global_batch_size={batch_size}",
                                          "train.precision=fp32", "train.channels_last=false", *overrides])
    state = build_train_state(config, device)
    if config.train.compile:
        state.model = torch.compile(state.model)
    images = torch.randn(batch_size, 3, 299, 299, device=device)
    if config.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch_size, 1000, device=device) < 0.01).float()
    start = time.perf_counter()
    first = train_step(state, config, images, targets)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        last = train_step(state, config, images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / elapsed, "step_s": elapsed / steps, "warmup_s": warmup_s,
            "loss_first": first.loss, "loss_last": last.loss, "bf16": config.train.precision == "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="benchmark-results/train_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = {False: matmul_rate(torch.float32, device), True: matmul_rate(torch.bfloat16, device)}
    train_flops_per_image = 3 * 2 * xception_macs(299, num_classes=1000)  # forward + ~2x for backward
    rows = {}
    for name in args.variants:
        try:
            result = run_variant(VARIANTS[name], args.batch_size, args.steps, device)
        except Exception as exc:  # a variant that does not work here is reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"{name}: failed: {rows[name]['error']}", flush=True)
            continue
        achieved = result["images_per_s"] * train_flops_per_image
        ceiling = rates[result["bf16"]]
        result.update(tflops=achieved / 1e12, fraction_of_matmul=achieved / ceiling if ceiling else None)
        rows[name] = result
        print(f"{name}: {result['images_per_s']:.2f} img/s", flush=True)

    print(f"\nXception 299x299 training step, batch {args.batch_size}, {device.type}, "
          f"{torch.get_num_threads()} threads; {train_flops_per_image / 1e9:.1f} GFLOP/image (3 x 2 x MACs)")
    if device.type == "cpu":
        print(f"matmul ceiling: fp32 {rates[False] / 1e9:.0f} GFLOP/s, bf16 {rates[True] / 1e9:.0f} GFLOP/s")
    reference = rows.get("fp32 eager")
    for r in rows.values():
        if "error" not in r:
            r["correct"] = correct(r, reference) if reference and "error" not in reference else None
    print(f"{'variant':<26} {'img/s':>8} {'s/step':>8} {'warm-up s':>10} {'GFLOP/s':>9} {'of matmul':>10} "
          f"{'loss':>14} {'correct':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26} {'failed: ' + r['error'][:80]}")
            continue
        frac = f"{r['fraction_of_matmul']:.1%}" if r["fraction_of_matmul"] is not None else "n/a"
        print(f"{name:<26} {r['images_per_s']:>8.2f} {r['step_s']:>8.2f} {r['warmup_s']:>10.1f} "
              f"{r['tflops'] * 1e3:>9.1f} {frac:>10} {r['loss_first']:>6.2f}->{r['loss_last']:<6.2f} "
              f"{'?' if r['correct'] is None else 'yes' if r['correct'] else 'NO':>8}")
    ok = {k: v for k, v in rows.items() if "error" not in v and v["correct"] is not False}
    if ok:
        print(f"fastest correct: {max(ok, key=lambda k: ok[k]['images_per_s'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.type, "machine": platform.processor() or platform.machine(),
                               "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                               "train_gflop_per_image": train_flops_per_image / 1e9,
                               "matmul_gflops": {"fp32": rates[False] / 1e9, "bf16": rates[True] / 1e9},
                               "variants": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

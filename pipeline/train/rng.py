"""Per-rank random state: different dropout masks on every rank, and the same masks after a resume.

`build_train_state` seeds every rank alike (identical initial weights); the loop then seeds each rank with
`train.seed + rank`. Checkpoints hold every rank's generator state (`rng`, a list in rank order); a resume with
the same world size restores it, one with another world size starts from `seed + rank` again (the data split is
new then too). The data loader draws its workers' base seed from torch's global generator when it starts, so the
loop fetches batches under `torch.random.fork_rng`: the model's random stream depends only on the steps taken.
"""

from __future__ import annotations

import torch


def seed_rank(seed: int, rank: int) -> None:
    torch.manual_seed(seed + rank)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generator states: CPU, and the CUDA device's when training on one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore `rng_state`'s result (its tensors may sit on `device`: checkpoints load with map_location)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)

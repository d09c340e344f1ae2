"""Per-rank random state as a checkpoint component: different dropout masks on every rank, the same after a resume.

`build_train_state` seeds every rank alike (identical initial weights); the loop then seeds each rank with
`train.seed + rank` (`RankRng.seed`). Checkpoints hold every rank's generator state (`rng`, a list in rank order);
a resume with the same world size restores this rank's, one with another world size keeps `seed + rank` (the data
split is new then too). The data loader draws its workers' base seed from torch's global generator when it starts,
so the loop fetches batches under `torch.random.fork_rng`: the model's random stream depends only on the steps taken.
"""

from __future__ import annotations

import torch


class RankRng:
    """This process's global generators (CPU, and the CUDA device's when training on one)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed + self.rank)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's generator states."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Restore this rank's entry of every rank's `state_dict()` (rank order), when the world size is the same.

        Its tensors may sit on the device: checkpoints load with map_location."""
        if len(states) != self.world_size:
            return
        state = states[self.rank]
        torch.set_rng_state(state["cpu"].cpu())
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

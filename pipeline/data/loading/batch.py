"""A batch of uint8 images and sparse labels, built in a worker's reusable shared memory and moved to the device.

Workers build batches in shared-memory buffers that they reuse: the main process copies each batch out (on CUDA
the pin-memory thread's copy is that copy) and hands the buffer back (`own_batch`), cheaper than a fresh
shared-memory file per batch. The small index tensors travel inline with the pickled batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One rank's batch. Images stay uint8 on the host; `to_device` moves them and builds multi-hot targets."""

    images: torch.Tensor  # uint8 (B, 3, H, W), channels-last memory (each image HWC, as decoded)
    label_ids: torch.Tensor  # int64 (L,): the class ids of every sample, concatenated
    label_offsets: torch.Tensor  # int64 (B + 1,): sample i has label_ids[offsets[i]:offsets[i + 1]]
    keys: list[str]  # sample keys ("" for padding)
    valid: torch.Tensor  # bool (B,): False for padding entries (evaluation; never counted)
    sample_ids: torch.Tensor  # int64 (B,): index in the whole dataset (manifest order); -1 for padding
    epoch: int
    segment: int
    slot: int
    index: int  # batch index within the slot's quota in this epoch segment
    position: int  # planned samples the slot has emitted after this batch
    stats: dict[str, Any] = field(default_factory=dict)  # the slot's counters since its previous item
    buffer: tuple[int, int] | None = None  # (worker, index): the worker's reusable buffer holding the images

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self, i: int) -> list[int]:
        return self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]].tolist()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (worker -> main process) with the small index tensors as numpy arrays, which travel inline:
        torch sends every tensor through its own shared-memory file and a descriptor handed over a socket, ~0.6 ms
        of CPU per tensor in all (measured), more than the rest of the hand-off. The images do go that way."""
        return {**self.__dict__, **{name: getattr(self, name).numpy() for name in _INLINE}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, **{name: torch.from_numpy(state[name]) for name in _INLINE}})

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), label_ids=self.label_ids.pin_memory(),
                                   label_offsets=self.label_offsets.pin_memory())


_INLINE = ("label_ids", "label_offsets", "valid", "sample_ids")


def to_device(batch: Batch, device: torch.device | str, num_classes: int,
              channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) on `device`: images uint8 (B, 3, H, W), still in pixel values (the model's own
    `preprocess_input` maps them to its input range, on the device, after the 4x cheaper uint8 copy); targets
    float32 multi-hot (B, num_classes), built on the device from the sparse ids. Padding rows are all zero."""
    if batch.label_ids.numel() and int(batch.label_ids.max()) >= num_classes:
        raise ValueError(f"batch has class id {int(batch.label_ids.max())} but num_classes={num_classes}")
    images = batch.images.to(device, non_blocking=True)  # layout changes on uint8 move a quarter of fp32 bytes
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    size = len(batch.label_offsets) - 1
    rows = torch.repeat_interleave(torch.arange(size), batch.label_offsets.diff())
    targets = torch.zeros(size, num_classes, device=device, dtype=torch.float32)
    targets[rows.to(device, non_blocking=True), batch.label_ids.to(device, non_blocking=True)] = 1.0
    return images, targets


class SharedBuffers:
    """A DataLoader worker's shared-memory image buffers, reused once the main process holds its own copy.

    A fresh shared-memory buffer per batch costs the kernel ~5 ms per 8.5 MB batch (allocating, zeroing and
    mapping the pages, then tearing them down; measured), more than the main process copying the batch out (~1.9 ms;
    on CUDA the pin-memory thread copies it anyway) and sending the buffer's index back on `returned`.
    """

    LIMIT = 6  # per worker: the DataLoader's prefetch (2), the batch being built, the one being copied, and room

    def __init__(self, worker: int, returned: Any) -> None:
        self.worker, self._returned = worker, returned
        self._buffers: list[torch.UntypedStorage] = []
        self._free: list[int] = []
        self._warned = False

    def acquire(self, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """(index, storage) of a free buffer; index -1 for a one-off buffer when every pooled one stays out."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._free.append(self._returned.get_nowait())
        if not self._free and len(self._buffers) == self.LIMIT:  # a return may still be on its way
            with contextlib.suppress(queue.Empty):
                self._free.append(self._returned.get(timeout=1.0))
        if self._free:
            index = self._free.pop()
            assert self._buffers[index].nbytes() == nbytes, "a worker's batches all have one size"
            return index, self._buffers[index]
        storage = torch.UntypedStorage._new_shared(nbytes)
        if len(self._buffers) < self.LIMIT:
            self._buffers.append(storage)
            return len(self._buffers) - 1, storage
        if not self._warned:
            self._warned = True
            log.warning("DataLoader worker %d: all %d shared batch buffers are out; using one-off buffers (slower)",
                        self.worker, self.LIMIT)
        return -1, storage


def own_batch(batch: Batch, returned: list[Any]) -> Batch:
    """`batch` with its images in this (the main) process's memory; hands the worker's shared buffer back."""
    assert batch.buffer is not None
    images = batch.images
    if not images.is_pinned():  # else the pin-memory thread has copied them already
        images = torch.empty_like(images).copy_(images)  # keeps channels-last
    worker, index = batch.buffer
    returned[worker].put(index)
    return dataclasses.replace(batch, images=images, buffer=None)


class BatchBuilder:
    """Collects decoded samples into one `Batch` of a fixed size; `finish` pads it and starts the next."""

    def __init__(self, size: int, image_size: int, buffers: SharedBuffers | None = None) -> None:
        self.size, self.image_size, self._buffers = size, image_size, buffers
        self._new()

    def _new(self) -> None:
        self._images: torch.Tensor | None = None  # acquired at the first next_image(): an empty builder holds none
        self.buffer: tuple[int, int] | None = None
        self.ids: list[int] = []
        self.offsets = [0]
        self.keys: list[str] = []
        self.sample_ids: list[int] = []

    @property
    def images(self) -> torch.Tensor:
        """(B, 3, H, W) uint8 in channels-last memory, the layout images decode in (`pipeline.data.loading.decode`)."""
        if self._images is None:
            side = self.image_size
            if self._buffers is not None:  # a DataLoader worker: build the batch in one of its shared buffers,
                # so that sending it to the main process copies nothing here
                index, storage = self._buffers.acquire(self.size * 3 * side ** 2)
                self.buffer = (self._buffers.worker, index) if index >= 0 else None
                hwc = torch.empty(0, dtype=torch.uint8).set_(storage).view(self.size, side, side, 3)
            else:
                hwc = torch.empty((self.size, side, side, 3), dtype=torch.uint8)
            self._images = hwc.permute(0, 3, 1, 2)
        return self._images

    def __len__(self) -> int:
        return len(self.keys)

    def next_image(self) -> torch.Tensor:
        """Where the next sample's image is decoded to (`add` then records it)."""
        return self.images[len(self.keys)]

    def add(self, labels: list[int], key: str, sample_id: int = -1) -> None:
        """Record the sample whose image is in `next_image()`."""
        self.ids.extend(labels)
        self.offsets.append(len(self.ids))
        self.keys.append(key)
        self.sample_ids.append(sample_id)

    def finish(self, valid: int, **where: Any) -> Batch:
        """The batch, padded to full size; the first `valid` entries count. `where`: the Batch's position fields."""
        while len(self.keys) < self.size:  # padding
            self.next_image().zero_()
            self.add([], "")
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[:valid] = True
        batch = Batch(self.images, torch.tensor(self.ids, dtype=torch.int64),
                      torch.tensor(self.offsets, dtype=torch.int64), self.keys, mask,
                      torch.tensor(self.sample_ids, dtype=torch.int64), buffer=self.buffer, **where)
        self._new()
        return batch

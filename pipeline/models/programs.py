"""Exported programs of a model: writing `torch.export` and ONNX files, running them, checking them against eager.

Both take the preprocessed float images (N, 3, H, W) (`preprocess_input`) and return the logits (N, C), with a
dynamic batch dimension (H and W are fixed at export). ONNX goes through `torch.onnx.export(dynamo=True)`, which
needs the `export` extra (onnx, onnxscript; onnxruntime runs and checks the result).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from pipeline.config import StorageConfig
from pipeline.storage import read_bytes

PROGRAM_FORMATS = ("torch_export", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "images", "logits"

Program = Callable[[Tensor], Tensor]


class ExportPackagesMissing(RuntimeError):
    """A format's packages are not installed; the message names what to install."""


class ProgramMismatch(RuntimeError):
    """An exported program's logits differ from the eager model's by more than the tolerance."""


def require_packages(formats: Sequence[str]) -> None:
    """Fail before any work if a requested format is unknown or its packages are missing."""
    unknown = sorted(set(formats) - set(PROGRAM_FORMATS))
    if unknown:
        raise ValueError(f"unknown program format(s) {unknown}; known: {list(PROGRAM_FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None] if "onnx" in formats else []
    if missing:
        raise ExportPackagesMissing(f"ONNX export needs {', '.join(missing)}: pip install -e '.[export]'")


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1)}


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The ONNX exporter's per-pass INFO lines, its "torchvision is not installed" warnings (no torchvision ops
    here) and a deprecation warning from inside torch, hidden while exporting."""
    quieter = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING,
               "torch.onnx._internal.exporter._registration": logging.ERROR}
    loggers = [logging.getLogger(name) for name in quieter]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, quieter.values(), strict=True):
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_program(model: nn.Module, fmt: str, example: Tensor, path: str, opset: int = 18) -> float:
    """Export `model` (eval mode) traced with `example` (a batch of at least 2 images, so the batch dimension is
    not specialised) to the local file `path`; returns the seconds it took."""
    require_packages([fmt])
    if example.shape[0] < 2:
        raise ValueError(f"the example batch needs at least 2 images to keep the batch dynamic, got {example.shape}")
    start = time.perf_counter()
    model = model.eval()
    with _quiet_exporters():
        if fmt == "torch_export":
            program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
            torch.export.save(program, path)
        else:
            torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=(_batch_dim(),),
                              opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              external_data=False, verbose=False)
    return time.perf_counter() - start


def load_program(url: str, fmt: str, storage: StorageConfig | None = None) -> Program:
    """A callable float images (N, 3, H, W) -> logits (N, C) running the exported program at `url` (any fsspec URL):
    the `torch.export` program's module, or an onnxruntime session (CUDA when available, else CPU)."""
    require_packages([fmt])
    data = read_bytes(url, storage)
    if fmt == "torch_export":
        module = torch.export.load(io.BytesIO(data)).module()
        return lambda images: module(images)
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = onnxruntime.InferenceSession(data, providers=providers)

    def run(images: Tensor) -> Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(logits)

    return run


def max_logit_difference(program: Program, model: nn.Module, images: Tensor, batch_sizes: Sequence[int]) -> float:
    """The largest |program - eager| logit over the first `b` of `images` for each batch size `b`."""
    worst = 0.0
    with torch.inference_mode():
        for size in batch_sizes:
            batch = images[:size]
            if batch.shape[0] != size:
                raise ValueError(f"batch size {size} asked for but only {images.shape[0]} images given")
            expected = model.eval()(batch).float()
            found = program(batch).float()
            if found.shape != expected.shape:
                raise ProgramMismatch(f"batch of {size}: the program returned {tuple(found.shape)}, "
                                      f"the eager model {tuple(expected.shape)}")
            worst = max(worst, float((found - expected).abs().max()))
    return worst


def check_program(program: Program, model: nn.Module, images: Tensor, batch_sizes: Sequence[int],
                  tolerance: float, name: str) -> float:
    """`max_logit_difference`, refused (ProgramMismatch, naming `name`) above `tolerance`."""
    difference = max_logit_difference(program, model, images, batch_sizes)
    if not difference <= tolerance:  # NaN fails too
        raise ProgramMismatch(f"{name}: logits differ from the eager model's by {difference:.3g} > {tolerance:g} "
                              f"(batch sizes {list(batch_sizes)})")
    return difference

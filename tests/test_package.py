"""The model package format: round trips (local and S3), read without training code, bad packages refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models.package import (
    PackageError,
    architecture_options,
    build_architecture,
    new_package,
    read_package,
    write_package,
)
from pipeline.models.thresholds import ClassThresholds
from pipeline.storage import join_url, read_bytes, write_bytes

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "boat", "tree", "sun"]
ARCHITECTURE = {"name": "xception", "num_classes": 5, "fc_layers": [16], "dropout": 0.25, "width_multiplier": 0.125,
                "middle_blocks": 1, "in_chans": 3}


def trained_like_model(seed: int = 0) -> torch.nn.Module:
    """A tiny Xception whose every tensor (weights, BN statistics, counters) differs from a fresh initialisation,
    so a round trip that loses or re-initialises any of them is caught."""
    torch.manual_seed(seed)
    model = build_architecture(ARCHITECTURE)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor))
            else:
                tensor.fill_(17)
    return model.eval()


def thresholds() -> ClassThresholds:
    return ClassThresholds(classes=CLASSES, thresholds=[0.1, 0.2, 0.3, 0.4, 0.35], global_threshold=0.35,
                           min_positives=5, step=40, positives=[9, 8, 7, 6, 2], f1=[0.5, 0.6, 0.7, 0.8, 0.1])


def example_package(with_thresholds: bool = True):
    return new_package(trained_like_model(), ARCHITECTURE, CLASSES, image_size=71, activation="sigmoid",
                       weights="ema", thresholds=thresholds() if with_thresholds else None,
                       source={"run": "runs/x", "checkpoint": "runs/x/checkpoints/step-000000040", "step": 40})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_keeps_every_tensor_the_architecture_classes_and_thresholds(where, tmp_path, request):
    url = str(tmp_path / "pkg") if where == "local" else request.getfixturevalue("s3_prefix") + "/pkg"
    package = example_package()
    written = write_package(url, package)
    loaded = read_package(url)

    expected, found = package.model.state_dict(), loaded.model.state_dict()
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name
    assert not loaded.model.training
    assert loaded.classes == CLASSES and loaded.thresholds == thresholds()
    assert loaded.metadata == written
    assert loaded.metadata["architecture"] == ARCHITECTURE and loaded.image_size == 71
    assert loaded.activation == "sigmoid" and loaded.metadata["weights"]["kind"] == "ema"
    assert loaded.metadata["source"]["step"] == 40
    images = torch.rand(3, 3, 71, 71) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.model(images), package.model(images))


def test_a_package_loads_in_a_process_that_imports_no_training_code(tmp_path):
    url = str(tmp_path / "pkg")
    package = example_package()
    write_package(url, package)
    images = torch.rand(2, 3, 71, 71) * 2 - 1
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        torch.save(package.model(images), tmp_path / "expected.pt")
    script = f"""
import json, sys, torch
from pipeline.models.package import read_package
torch.set_num_threads({torch.get_num_threads()})  # the same kernels as this process: the logits compare bitwise
model, classes, thresholds, metadata = read_package({url!r})
with torch.no_grad():
    logits = model(torch.load({str(tmp_path / 'images.pt')!r}))
assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
print(json.dumps({{"classes": classes, "modules": sorted(m for m in sys.modules if m.startswith("pipeline"))}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["classes"] == CLASSES
    assert "pipeline.models.package" in report["modules"]
    training = [m for m in report["modules"] if m.split(".")[:2][-1] in ("train", "evaluation", "inference", "data")]
    assert training == [], f"reading a package imported {training}"


def test_a_package_without_thresholds_reads_none(tmp_path):
    write_package(str(tmp_path), example_package(with_thresholds=False))
    assert read_package(str(tmp_path)).thresholds is None


def test_names_that_do_not_fit_the_model_are_refused():
    model = trained_like_model()
    with pytest.raises(PackageError, match="4 class names for a model with 5 classes"):
        new_package(model, ARCHITECTURE, CLASSES[:4], image_size=71, activation="sigmoid", weights="ema")
    with pytest.raises(PackageError, match="thresholds are for other classes"):
        new_package(model, ARCHITECTURE, CLASSES[::-1], image_size=71, activation="sigmoid", weights="ema",
                    thresholds=thresholds())
    with pytest.raises(PackageError, match="does not match architecture"):
        new_package(model, {**ARCHITECTURE, "fc_layers": [32]}, CLASSES, image_size=71, activation="sigmoid",
                    weights="ema")
    with pytest.raises(PackageError, match="architecture must be name='xception' with the keys"):
        build_architecture({**ARCHITECTURE, "head_bias": 0.0})


def test_damaged_foreign_and_missing_packages_are_refused(tmp_path):
    with pytest.raises(PackageError, match=r"is not a model package: it has no model\.json"):
        read_package(str(tmp_path / "nothing"))
    with pytest.raises(PackageError, match="unknown program format"):
        write_package(str(tmp_path / "p"), example_package(), programs={"tflite": __file__})

    url = str(tmp_path / "pkg")
    write_package(url, example_package())
    manifest = json.loads(read_bytes(join_url(url, "model.json")))
    write_bytes(join_url(url, "model.json"), json.dumps({**manifest, "version": 99}).encode())
    with pytest.raises(PackageError, match="not a model package of format xception-pipeline-model version 1"):
        read_package(url)

    write_package(url, example_package())
    weights = bytearray(read_bytes(join_url(url, "model.safetensors")))
    weights[-1] ^= 0xFF
    write_bytes(join_url(url, "model.safetensors"), bytes(weights))
    with pytest.raises(PackageError, match="checksum differs"):
        read_package(url)


def test_architecture_options_are_exactly_the_xception_arguments_that_shape_the_model():
    from pipeline.config import load_config
    from pipeline.models import build_model

    config = load_config("demo", ["model.num_classes=7", "model.fc_layers=[24]", "model.middle_blocks=2"])
    rebuilt, original = build_architecture(architecture_options(config.model)), build_model(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in original.state_dict().items()}

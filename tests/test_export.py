"""Export: a real short run's checkpoint as a package whose torch.export and ONNX programs match eager."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from conftest import copy_with_swapped_classes
from test_checkpoint import tiny_config
from test_package import ARCHITECTURE

from pipeline.checkpoint.format import checkpoint_url, read_checkpoint_state, write_checkpoint
from pipeline.config import ExportConfig
from pipeline.data.format import class_fingerprint, read_classes, read_manifest
from pipeline.inference.export import check_images, export_model
from pipeline.inference.model_source import load_model
from pipeline.models import preprocess_input
from pipeline.models.package import build_architecture, program_url, read_package
from pipeline.models.programs import ProgramMismatch, check_program, load_program, max_logit_difference
from pipeline.models.thresholds import ClassThresholds, write_thresholds
from pipeline.storage import join_url
from pipeline.train.loop import train
from pipeline.train.step import build_train_state

JOB = Path(__file__).resolve().parents[1] / "jobs/export_model.py"


def export_job():
    spec = importlib.util.spec_from_file_location("export_model", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def tiny_run(tiny_demo, tmp_path_factory):
    """A real 4-step run of the tiny model on the tiny demo data, with checkpoints at steps 2 and 4."""
    config = tiny_config(tiny_demo, tmp_path_factory.mktemp("runs"), "train.total_steps=4",
                         "checkpoint.every_steps=2", "checkpoint.background=false")
    train(config)
    return config


def class_names(prefix):
    return [c.name for c in read_classes(prefix, read_manifest(prefix))]


def real_images(tiny_demo, count, size=71):
    """Evaluation images of the tiny demo, decoded by the project's loader, in the model's input range."""
    config = tiny_config(tiny_demo, "unused")
    return preprocess_input(check_images(tiny_demo.eval, config, count, size))


def test_a_runs_checkpoint_exports_with_its_classes_thresholds_and_programs_matching_eager(tiny_run, tiny_demo):
    names = class_names(tiny_demo.train)
    written = ClassThresholds(classes=names, thresholds=[0.5] * len(names), global_threshold=0.5, min_positives=5,
                              step=4)
    write_thresholds(join_url(tiny_run.run_dir, "reports", "thresholds", "step-000000004.json"), written)
    settings = tiny_run.model_copy(update={"export": ExportConfig(check_images=6)})

    result = export_model(tiny_run.run_dir, settings)

    assert result.url == join_url(tiny_run.run_dir, "export", "step-000000004")
    package = read_package(result.url)
    ema = read_checkpoint_state(checkpoint_url(tiny_run.run_dir, 4))["ema"]["shadow"]
    for name, tensor in package.model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    assert package.classes == names and package.thresholds == written
    assert package.metadata["source"]["step"] == 4 and package.image_size == 71
    programs = package.metadata["programs"]
    assert sorted(programs) == ["onnx", "torch_export"]
    for record in programs.values():
        assert record["checked_batch_sizes"] == [1, 6] and record["max_abs_logit_difference"] <= 1e-4
        assert record["checked_on"] == tiny_demo.eval

    # Independently of the export's own check: the published files, at other batch sizes (the batch is dynamic).
    images = real_images(tiny_demo, 5)
    for fmt in ("torch_export", "onnx"):
        program = load_program(program_url(result.url, fmt), fmt)
        assert max_logit_difference(program, package.model, images, [3, 5]) <= 1e-4, fmt
    # The run directory itself serves the same model to prediction.
    from_run = load_model(tiny_run.run_dir)
    with torch.no_grad():
        torch.testing.assert_close(from_run.model(images), package.model(images), rtol=0, atol=0)
    assert from_run.classes == names and from_run.thresholds == written


def test_the_job_exports_a_named_checkpoint_with_raw_weights_and_no_thresholds(tiny_run, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.inference.model_source")
    checkpoint = checkpoint_url(tiny_run.run_dir, 2)
    out = str(tmp_path / "package")
    code = export_job()(["--checkpoint", checkpoint, "--out", out, "export.formats=[safetensors]",
                         "export.weights=raw"])
    assert code == 0
    assert f"exported step 2 (raw weights) to {out}" in capsys.readouterr().out
    assert "no decision thresholds for step 2" in caplog.text
    package = read_package(out)
    raw = read_checkpoint_state(checkpoint)["model"]
    for name, tensor in package.model.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    assert package.thresholds is None and package.metadata["programs"] == {}


def test_the_parity_check_refuses_a_program_that_differs(tiny_demo):
    torch.manual_seed(0)
    model = build_architecture({**ARCHITECTURE, "fc_layers": []})
    images = real_images(tiny_demo, 4)
    assert check_program(lambda x: model(x), model, images, [1, 4], 1e-4, "same") == 0.0
    with pytest.raises(ProgramMismatch, match=r"off by one: logits differ from the eager model's by 0\.001"):
        check_program(lambda x: model(x) + 1e-3, model, images, [1, 4], 1e-4, "off by one")


def test_runs_without_a_checkpoint_and_unknown_formats_are_refused_with_exit_code_2(tmp_path, capsys):
    job = export_job()
    assert job([f"run.storage={tmp_path}", "run.name=empty"]) == 2
    assert f"no complete checkpoint in {tmp_path}/empty/checkpoints" in capsys.readouterr().err
    assert job([f"run.storage={tmp_path}", "export.formats=[safetensors,tflite]"]) == 2
    assert "config key 'export.formats.1' = 'tflite'" in capsys.readouterr().err
    assert job(["--checkpoint", f"{tmp_path}/run/checkpoints/step-000000007"]) == 2
    assert "is not a complete checkpoint (no COMMIT marker)" in capsys.readouterr().err


def test_a_checkpoint_without_ema_or_with_changed_classes_is_refused(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, "train.ema_decay=null")
    state = build_train_state(config).state_dict()
    trained_on = class_fingerprint(tiny_demo.train, read_manifest(tiny_demo.train))
    write_checkpoint(config.run_dir, 1, state, config, extra={"class_fingerprint": trained_on})
    with pytest.raises(ValueError, match="has no EMA weights"):
        export_model(config.run_dir, config)

    swapped = copy_with_swapped_classes(tiny_demo.train, tmp_path / "swapped")
    other = class_fingerprint(swapped, read_manifest(swapped))
    write_checkpoint(config.run_dir, 2, state, config, extra={"class_fingerprint": other})
    with pytest.raises(ValueError, match="are not the ones the checkpoint was trained with"):
        export_model(config.run_dir, config.model_copy(update={"export": ExportConfig(weights="raw")}))

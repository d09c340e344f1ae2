"""Keras fidelity: Keras' own Xception (keras 3 on its torch backend, no TensorFlow) is the independent reference.

Random weights (every variable, BatchNorm statistics included) are set in `keras.applications.Xception`, written by
Keras in both of its weights layouts (the legacy HDF5 one of the ImageNet file, and Keras 3's `.weights.h5`),
imported by `pipeline.models.weights`, and must give Keras' activations after every block and its logits, at 299 px
(block 3's max-pooling sees 74 x 74: TensorFlow's 'same' padding) and at the demo's 128 px.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported, here and in anything it imports

import numpy as np
import pytest
import torch

from pipeline.models import Xception
from pipeline.models.weights import keras_layer_map, load_into, parse_init_source, read_keras_weights

keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

# The Keras layer whose output is each of this model's block outputs: the stem's and the exit's last ReLU, and the
# residual adds (Keras numbers those per session, so they are found by position: the k-th `Add` is block k + 2).
BLOCKS = ["entry_flow.block2", "entry_flow.block3", "entry_flow.block4",
          *(f"middle_flow.block{b}" for b in range(5, 13)), "exit_flow.block13"]


def block_outputs(model) -> dict[str, str]:
    adds = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == len(BLOCKS)
    return {"entry_flow.act2": "block1_conv2_act", **dict(zip(BLOCKS, adds, strict=True)),
            "exit_flow.act4": "block14_sepconv2_act"}


def keras_xception(size: int):
    """Keras' Xception for `size` px images, its head giving logits (no softmax)."""
    return keras.applications.Xception(weights=None, input_shape=(size, size, 3), classes=1000,
                                       classifier_activation=None)


@pytest.fixture(scope="module")
def keras_model():
    """Keras' Xception at 299 px with every variable random."""
    keras.utils.set_random_seed(0)
    model = keras_xception(299)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        values = []
        for variable in layer.weights:
            shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
            if name in ("gamma", "moving_variance"):
                values.append(rng.uniform(0.5, 1.5, shape))
            elif name in ("beta", "moving_mean", "bias"):
                values.append(rng.normal(0.0, 0.2, shape))
            else:  # kernels: unit-gain scale over their fan-in, so activations neither vanish nor explode
                fan_in = int(np.prod(shape[:-1])) if name != "depthwise_kernel" else int(np.prod(shape[:2]))
                values.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape))
        if values:
            layer.set_weights([v.astype("float32") for v in values])
    return model


@pytest.fixture(scope="module")
def weight_files(keras_model, tmp_path_factory):
    """The random weights as Keras writes them: legacy HDF5 (the ImageNet file's layout) and Keras 3's own."""
    from keras.src.legacy.saving import legacy_h5_format

    root = tmp_path_factory.mktemp("keras-weights")
    legacy, native = root / "xception_random.h5", root / "xception_random.weights.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
    keras_model.save_weights(native)
    return {"legacy": str(legacy), "keras3": str(native)}


def test_both_keras_layouts_import_to_the_same_state(weight_files, keras_model):
    legacy, native = (read_keras_weights(weight_files[k]) for k in ("legacy", "keras3"))
    assert legacy.keys() == native.keys()
    for name, tensor in legacy.items():
        assert torch.equal(tensor, native[name]), name
    model = Xception(1000)
    summary = load_into(model, legacy, {"kind": "keras", "url": weight_files["legacy"]})
    assert summary.head == "loaded" and summary.fresh == [] and summary.unexpected == []
    keras_values = sum(int(np.prod(v.shape)) for v in keras_model.weights)
    assert summary.loaded_parameters == keras_values == 22_910_480  # 22,855,952 trainable + 54,528 BN statistics
    # every Keras layer with weights has its place in the map
    assert {layer.name for layer in keras_model.layers if layer.weights and not layer.name.startswith(
        ("conv2d", "batch_normalization"))} <= set(keras_layer_map())


def test_the_documented_ways_to_save_from_keras_3_are_read(keras_model, weight_files, tmp_path):
    """Keras 3 refuses `save_weights("x.h5")`; the two calls the docs give instead (Use your model) give files we
    read."""
    page = (Path(__file__).parents[1] / "infra" / "docs" / "pages" / "use-your-model.md").read_text()
    calls = ['model.save_weights("xception.weights.h5")', 'model.save("xception.h5")']
    assert all(call in page for call in calls)
    with pytest.raises(ValueError, match=r"must end in `\.weights\.h5`"):
        keras_model.save_weights(str(tmp_path / "xception.h5"))
    keras_model.save_weights(str(tmp_path / "xception.weights.h5"))
    keras_model.save(str(tmp_path / "xception.h5"))
    legacy = read_keras_weights(weight_files["legacy"])
    for name in ("xception.weights.h5", "xception.h5"):
        assert parse_init_source(str(tmp_path / name)).kind == "keras"
        read = read_keras_weights(str(tmp_path / name))
        assert read.keys() == legacy.keys() and all(torch.equal(read[k], legacy[k]) for k in legacy), name


@pytest.mark.parametrize("size", [299, 128])
def test_activations_and_logits_match_keras(weight_files, keras_model, size):
    if size != 299:  # Keras' model with a top has a static input size: another model, the same weights
        other = keras_xception(size)
        other.set_weights(keras_model.get_weights())
        keras_model = other
    model = Xception(1000).eval()
    load_into(model, read_keras_weights(weight_files["legacy"]))
    images = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype("float32")

    outputs = block_outputs(keras_model)
    probe = keras.Model(keras_model.inputs, [keras_model.get_layer(n).output for n in outputs.values()]
                        + [keras_model.output])
    expected = [keras.ops.convert_to_numpy(out) for out in probe(images, training=False)]

    ours: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: ours.__setitem__(name, out.clone()))
               for name in outputs]
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    for handle in handles:
        handle.remove()

    def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
        return float(np.abs(actual - reference).max() / np.abs(reference).max())

    for (name, keras_name), reference in zip(outputs.items(), expected, strict=False):
        actual = ours[name].permute(0, 2, 3, 1).numpy()
        assert actual.shape == reference.shape, name
        assert relative_error(actual, reference) <= 1e-4, (name, keras_name, relative_error(actual, reference))
    assert logits.shape == expected[-1].shape == (2, 1000)
    assert relative_error(logits, expected[-1]) <= 1e-4
    assert np.abs(expected[-1]).max() > 1.0  # the logits are not a collapsed near-zero output


def test_pytorch_padded_pooling_would_not_match_keras_at_299(weight_files, keras_model):
    """The test above can fail: PyTorch's symmetric max-pool padding (what this model had before) gives other
    activations from block 3 on at 299 px."""
    model = Xception(1000).eval()
    load_into(model, read_keras_weights(weight_files["legacy"]))
    model.entry_flow.block3.layers[-1] = torch.nn.MaxPool2d(3, 2, padding=1)
    images = np.random.default_rng(1).uniform(-1, 1, (1, 299, 299, 3)).astype("float32")
    block3 = keras_model.get_layer(block_outputs(keras_model)["entry_flow.block3"])
    probe = keras.Model(keras_model.inputs, block3.output)
    reference = keras.ops.convert_to_numpy(probe(images, training=False))
    with torch.no_grad():
        features = model.entry_flow[:-1](torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    actual = features.permute(0, 2, 3, 1).numpy()
    assert np.abs(actual - reference).max() / np.abs(reference).max() > 1e-2

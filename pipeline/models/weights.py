"""Start weights for an `Xception`: read from another run, Keras' `.h5` files or timm's `legacy_xception`, and load.

Every reader returns a state dict in this model's names (`Xception.state_dict()` keys, PyTorch layouts):

- a run of this project (`read_run_weights`): a checkpoint directory, or a run directory (its latest complete
  checkpoint, through `pipeline.checkpoint`); the EMA weights by default, the raw ones on request (a run without
  EMA weights is refused when they are asked for: `pipeline.checkpoint`'s one policy).
- Keras' Xception weights (`read_keras_weights`): the files `keras.applications.Xception` loads (the paper author's
  ImageNet model, `xception_weights_tf_dim_ordering_tf_kernels[_notop].h5`: the legacy Keras 2 HDF5 layout, a
  group per layer) and Keras 3's `model.save_weights` layout (`.weights.h5`). Names: `keras_layer_map`.
- a PyTorch state dict in timm's `legacy_xception` layout (`read_timm_weights`; `.pth`/`.pt`/`.bin` or
  `.safetensors`). Names: `timm_to_model_name`.

`load_into` then applies the fine-tuning rule: the backbone must match tensor for tensor (a missing tensor or a
shape mismatch is an error naming it), the head (FC layers and classifier) is taken only when all of it matches,
otherwise it stays as freshly initialised (the `head_bias` rule); it returns what it did as an `InitSummary`.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.checkpoint import find_checkpoint, read_weights
from pipeline.config import StorageConfig
from pipeline.models.xception import is_head
from pipeline.storage.files import exists, read_bytes
from pipeline.storage.paths import absolute_url

SourceKind = Literal["run", "keras", "timm"]
_PREFIXES: dict[str, SourceKind] = {"run:": "run", "keras:": "keras", "timm:": "timm"}
_TIMM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_OPTIONAL = "num_batches_tracked"  # BatchNorm's step counter: not a weight (Keras and timm files may lack it)


@dataclass(frozen=True)
class InitSource:
    kind: SourceKind
    url: str


def parse_init_source(spec: str) -> InitSource:
    """`model.init_from` -> its kind and URL: a `run:`, `keras:` or `timm:` prefix, else by the name's ending
    (`.h5` Keras; `.pth`, `.pt`, `.bin`, `.safetensors` timm; anything else a run or checkpoint directory)."""
    for prefix, kind in _PREFIXES.items():
        if spec.startswith(prefix):
            return InitSource(kind, spec[len(prefix):])
    name = spec.rstrip("/").lower()
    if name.endswith(".h5"):
        return InitSource("keras", spec)
    if name.endswith(_TIMM_SUFFIXES):
        return InitSource("timm", spec)
    return InitSource("run", spec)


def absolute_init_source(spec: str) -> str:
    """`model.init_from` with its kind spelled out and a local path made absolute (Ray workers have other working
    directories): `keras:/abs/xception.h5`."""
    source = parse_init_source(spec)
    return f"{source.kind}:{absolute_url(source.url)}"


def check_init_source(spec: str, storage: StorageConfig | None = None, *, fits: Mapping[str, Tensor] | None = None,
                      weights: Literal["ema", "raw"] = "ema") -> None:
    """Refuse a source that is not there (before a launch): a file that does not exist, a run without a complete
    checkpoint. With `fits` (a model's state dict, on the meta device is enough: only shapes are compared) also one
    whose tensors would not load into that model, with `load_into`'s rule: found at a launch, the mismatch is one
    line before any worker starts; found by the workers, Ray Train would retry it as if it were a crash."""
    source = parse_init_source(spec)
    if source.kind == "run":
        if find_checkpoint(source.url, storage) is None:
            raise FileNotFoundError(f"model.init_from={spec}: neither a complete checkpoint (no COMMIT) nor a run "
                                    "directory with one under checkpoints/")
    elif not exists(source.url, storage):
        raise FileNotFoundError(f"model.init_from={spec}: no such {source.kind} weights file")
    if fits is not None:
        _check_backbone(fits, read_init_weights(spec, storage, weights).state, spec)


@dataclass
class SourceWeights:
    """A state dict in this model's names, and where it came from (for the summary)."""

    state: dict[str, Tensor]
    source: dict[str, Any]


def read_init_weights(spec: str, storage: StorageConfig | None = None,
                      weights: Literal["ema", "raw"] = "ema") -> SourceWeights:
    """The weights `model.init_from` names, in this model's names (`weights`: a run's EMA or raw weights)."""
    source = parse_init_source(spec)
    if source.kind == "run":
        return read_run_weights(source.url, storage, weights)
    reader = read_keras_weights if source.kind == "keras" else read_timm_weights
    return SourceWeights(reader(source.url, storage), {"kind": source.kind, "url": source.url})


# A run of this project -------------------------------------------------------------------------------------------

def read_run_weights(url: str, storage: StorageConfig | None = None,
                     weights: Literal["ema", "raw"] = "ema") -> SourceWeights:
    """The weights of a checkpoint directory, or of a run directory's latest complete checkpoint."""
    ref = find_checkpoint(url, storage)
    if ref is None:
        check_init_source(f"run:{url}", storage)  # raises, naming what is missing
    tensors = read_weights(ref.url, weights, storage)
    return SourceWeights(tensors, {"kind": "run", "url": url, "checkpoint": ref.url, "step": ref.step,
                                   "weights": weights})


# Keras ----------------------------------------------------------------------------------------------------------

def keras_layer_map() -> OrderedDict[str, str]:
    """Keras' Xception layer names -> this model's modules, in Keras 3's `model.layers` order.

    The four shortcut convs and their BatchNorms have no names in Keras' code (Keras calls them `conv2d[_N]` and
    `batch_normalization[_N]`, numbered by creation: `_1` ... `_4` in the Keras 2 ImageNet file); here they are
    `block{2,3,4,13}_shortcut[_bn]`. `block14_sepconv1/2` are the exit flow's last two separable convs.
    """
    names: OrderedDict[str, str] = OrderedDict()
    for index in (1, 2):
        names[f"block1_conv{index}"] = f"entry_flow.conv{index}"
        names[f"block1_conv{index}_bn"] = f"entry_flow.bn{index}"
    for block in range(2, 14):
        flow = "entry_flow" if block <= 4 else "middle_flow" if block <= 12 else "exit_flow"
        convs = 3 if 5 <= block <= 12 else 2
        first = 0 if block == 2 else 1  # block 2 starts without a ReLU
        for i in range(convs):
            names[f"block{block}_sepconv{i + 1}"] = f"{flow}.block{block}.layers.{first + 3 * i}"
            names[f"block{block}_sepconv{i + 1}_bn"] = f"{flow}.block{block}.layers.{first + 3 * i + 1}"
        if convs == 2:
            names[f"block{block}_shortcut"] = f"{flow}.block{block}.shortcut.0"
            names[f"block{block}_shortcut_bn"] = f"{flow}.block{block}.shortcut.1"
    for index, ours in ((1, 3), (2, 4)):
        names[f"block14_sepconv{index}"] = f"exit_flow.conv{ours}"
        names[f"block14_sepconv{index}_bn"] = f"exit_flow.bn{ours}"
    names["predictions"] = "classifier"
    return names


_SHORTCUT_BLOCKS = (2, 3, 4, 13)
# Keras variable name -> (suffix of this model's tensor, axes permutation from Keras' layout to PyTorch's)
_KERAS_VARIABLES: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "kernel": ("weight", None),  # conv (H, W, in, out) -> (out, in, H, W); dense (in, out) -> (out, in)
    "depthwise_kernel": ("depthwise.weight", (2, 3, 0, 1)),  # (H, W, C, 1) -> (C, 1, H, W)
    "pointwise_kernel": ("pointwise.weight", (3, 2, 0, 1)),
    "bias": ("bias", None),
    "gamma": ("weight", None), "beta": ("bias", None),
    "moving_mean": ("running_mean", None), "moving_variance": ("running_var", None),
}
# Keras 3 `.weights.h5`: layers are keyed by class (`conv2d_3`), variables by position.
_KERAS3_VARIABLES = {"conv2d": ["kernel"], "separable_conv2d": ["depthwise_kernel", "pointwise_kernel"],
                     "batch_normalization": ["gamma", "beta", "moving_mean", "moving_variance"],
                     "dense": ["kernel", "bias"]}


def _keras_class(layer: str) -> str:
    if layer == "predictions":
        return "dense"
    if layer.endswith("_bn"):
        return "batch_normalization"
    return "separable_conv2d" if "sepconv" in layer else "conv2d"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _suffix_number(name: str) -> int:
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


def _legacy_keras_layers(group: Any) -> dict[str, dict[str, np.ndarray]]:
    """Keras 2 / legacy HDF5: `layer_names` attribute, a group per layer with `weight_names` (`layer/kernel:0`)."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name in map(_text, group.attrs["layer_names"]):
        weight_names = [_text(w) for w in group[name].attrs.get("weight_names", [])]
        if weight_names:
            layers[name] = {w.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[name][w]) for w in weight_names}
    anonymous = {}  # shortcut convs and BNs: Keras numbers them by creation order
    for kind in ("conv2d", "batch_normalization"):
        found = sorted((n for n in layers if re.fullmatch(rf"{kind}(_\d+)?", n)), key=_suffix_number)
        if found and len(found) != len(_SHORTCUT_BLOCKS):
            raise ValueError(f"Keras weights: expected {len(_SHORTCUT_BLOCKS)} unnamed {kind} layers (the shortcuts), "
                             f"found {found}")
        for block, name in zip(_SHORTCUT_BLOCKS, found, strict=False):
            anonymous[name] = f"block{block}_shortcut" + ("_bn" if kind == "batch_normalization" else "")
    return {anonymous.get(name, name): weights for name, weights in layers.items()}


def _keras3_layers(group: Any) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3 `.weights.h5`: `layers/<class>[_N]/vars/<i>`, N counting that class in `model.layers` order."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    seen: dict[str, int] = {}
    for layer in keras_layer_map():
        kind = _keras_class(layer)
        count = seen.get(kind, 0)
        seen[kind] = count + 1
        key = kind if count == 0 else f"{kind}_{count}"
        if key not in group["layers"]:
            continue  # a file without the top (predictions)
        variables = group["layers"][key]["vars"]
        layers[layer] = {name: np.asarray(variables[str(i)]) for i, name in enumerate(_KERAS3_VARIABLES[kind])
                         if str(i) in variables}
    return layers


def keras_layers_to_state(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, Tensor]:
    """Per-layer Keras arrays (canonical layer names, see `keras_layer_map`) -> this model's state dict; layers
    this model lacks keep their Keras name (`load_into` reports them as unexpected)."""
    modules = keras_layer_map()
    state: dict[str, Tensor] = {}
    for layer, variables in layers.items():
        for variable, array in variables.items():
            suffix, axes = _KERAS_VARIABLES.get(variable, (variable, None))
            if axes is None and variable == "kernel":
                axes = (3, 2, 0, 1) if array.ndim == 4 else (1, 0)
            tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(axes) if axes else array)).float()
            state[f"{modules[layer]}.{suffix}" if layer in modules else f"{layer}/{variable}"] = tensor
    return state


def read_keras_weights(url: str, storage: StorageConfig | None = None) -> dict[str, Tensor]:
    """Keras' Xception weights file (legacy HDF5 or Keras 3 `.weights.h5`) as this model's state dict."""
    import h5py

    with h5py.File(io.BytesIO(read_bytes(url, storage)), "r") as h5:
        group = h5.get("model_weights", h5)  # a whole-model .h5 holds its weights there
        if "layer_names" in group.attrs:
            layers = _legacy_keras_layers(group)
        elif "layers" in group:
            layers = _keras3_layers(group)
        else:
            raise ValueError(f"{url}: not a Keras weights file (no 'layer_names' attribute, no 'layers' group)")
    return keras_layers_to_state(layers)


# timm legacy_xception ---------------------------------------------------------------------------------------------

_TIMM_RULES = [  # timm legacy_xception (Cadene's port of the Keras model) -> this model
    (r"(conv|bn)([12])\.(.+)", r"entry_flow.\1\2.\3"),
    (r"conv([34])\.conv1\.(.+)", r"exit_flow.conv\1.depthwise.\2"),
    (r"(conv|bn)([34])\.(.+)", r"exit_flow.\1\2.\3"),
    (r"block(\d+)\.rep\.(\d+)\.conv1\.(.+)", r"{flow}.block{block}.layers.\2.depthwise.\3"),
    (r"block(\d+)\.rep\.(.+)", r"{flow}.block{block}.layers.\2"),
    (r"block(\d+)\.skip\.(.+)", r"{flow}.block{block}.shortcut.0.\2"),
    (r"block(\d+)\.skipbn\.(.+)", r"{flow}.block{block}.shortcut.1.\2"),
    (r"fc\.(.+)", r"classifier.\1"),
]


def timm_to_model_name(name: str) -> str | None:
    """A timm `legacy_xception` state-dict key -> this model's, or None for a key outside that layout.

    timm's `block1` ... `block12` are this model's blocks 2 ... 13 (the paper's numbering: block 1 is the stem);
    inside a block `rep.I` is `layers.I` (the same Sequential layout), `skip`/`skipbn` are `shortcut.0`/`.1`; a
    separable conv's depthwise part is `conv1`; `conv3`/`conv4` and `bn1`-`bn4` keep their names, `fc` is
    `classifier`."""
    for pattern, replacement in _TIMM_RULES:
        match = re.fullmatch(pattern, name)
        if match:
            if "{block}" in replacement:
                block = int(match.group(1)) + 1
                flow = "entry_flow" if block <= 4 else "middle_flow" if block <= 12 else "exit_flow"
                replacement = replacement.format(flow=flow, block=block)
            return match.expand(replacement)
    return None


def read_timm_weights(url: str, storage: StorageConfig | None = None) -> dict[str, Tensor]:
    """A timm `legacy_xception` state dict (`torch.save`d, possibly under "state_dict"/"model" and with DDP's
    "module." prefix, or safetensors) as this model's state dict; keys outside the layout keep their name."""
    data = read_bytes(url, storage)
    if url.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError as error:
            raise ImportError(f"{url}: reading .safetensors needs the safetensors package (pip install "
                              "safetensors), or save the state dict with torch.save as .pth") from error

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    result = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")
        result[timm_to_model_name(name) or name] = tensor
    return result


# Loading --------------------------------------------------------------------------------------------------------

@dataclass
class InitSummary:
    """What `load_into` did; written into the run as `init_from.json`."""

    source: dict[str, Any]
    loaded_tensors: int = 0
    loaded_parameters: int = 0
    head: str = "fresh"
    fresh: list[str] = field(default_factory=list)  # this model's tensors left as initialised
    unexpected: list[str] = field(default_factory=list)  # source tensors this model has no place for
    not_used: list[str] = field(default_factory=list)  # source head tensors left out (the head did not fit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = self.source.get("checkpoint") or self.source.get("url")
        text = (f"initialised from {self.source.get('kind')} weights {where}: {self.loaded_tensors} tensors "
                f"({self.loaded_parameters:,} values) loaded; head {self.head}")
        if self.fresh:
            text += f"; left fresh: {', '.join(self.fresh)}"
        if self.unexpected:
            text += f"; unexpected in the source (ignored): {', '.join(self.unexpected[:10])}"
            text += f" and {len(self.unexpected) - 10} more" if len(self.unexpected) > 10 else ""
        return text


def _head_fits(own: dict[str, Tensor], state: dict[str, Tensor]) -> tuple[bool, str]:
    ours = {k: v.shape for k, v in own.items() if is_head(k) and not k.endswith(_OPTIONAL)}
    theirs = {k: v.shape for k, v in state.items() if is_head(k) and not k.endswith(_OPTIONAL)}
    if not theirs:
        return False, "fresh: the source has no head"
    if ours != theirs:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in theirs.items() if k.endswith("weight"))
        return False, f"fresh: the source's head ({shapes}) is not this model's (model.num_classes, model.fc_layers)"
    return True, "loaded"


def _check_backbone(own: Mapping[str, Tensor], state: Mapping[str, Tensor], where: str) -> None:
    """Every backbone tensor of this model is in `state` with its shape; else a ValueError naming the first one."""
    missing = []
    for name, target in own.items():
        if is_head(name) or (name.endswith(_OPTIONAL) and name not in state):
            continue
        if name not in state:
            missing.append(name)
        elif state[name].shape != target.shape:
            raise ValueError(f"model.init_from={where}: tensor {name!r} has shape {tuple(state[name].shape)} there, "
                             f"{tuple(target.shape)} in this model (model.width_multiplier / middle_blocks / "
                             "num_classes must describe the same architecture)")
    if missing:
        raise ValueError(f"model.init_from={where}: {len(missing)} of this model's tensors are not in the source, "
                         f"e.g. {missing[:5]} (is it this architecture?)")


@torch.no_grad()
def load_into(model: nn.Module, state: dict[str, Tensor], source: dict[str, Any] | None = None) -> InitSummary:
    """Copy `state` (this model's names) into the plain `Xception` `model`; the backbone must match exactly, the head
    is taken only if all of it matches. Checks everything before copying anything: on a ValueError (naming the
    first mismatched or missing backbone tensor) the model is unchanged."""
    own = model.state_dict()
    _check_backbone(own, state, (source or {}).get("url", "the source"))
    head_fits, head = _head_fits(own, state)
    summary = InitSummary(source=dict(source or {}), head=head)
    for name, target in own.items():
        if is_head(name) and not head_fits:
            if not name.endswith(_OPTIONAL):
                summary.fresh.append(name)
        elif name in state:
            target.copy_(state[name])
            summary.loaded_tensors += 1
            summary.loaded_parameters += target.numel()
    summary.unexpected = sorted(k for k in state if k not in own)
    summary.not_used = sorted(k for k in state if k in own and is_head(k) and not head_fits)
    return summary

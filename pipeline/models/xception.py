"""Xception (Chollet, CVPR 2017), layer for layer as Keras `applications/xception.py`, in PyTorch.

Blocks are named after the paper: `entry_flow` (stem + blocks 2-4), `middle_flow` (blocks 5-12), `exit_flow`
(block 13 + two separable convs), then global average pooling, optional FC layers and the logistic layer.
Keras defaults are kept where PyTorch's differ: no conv biases, BatchNorm eps 1e-3 / momentum 0.01 (Keras 0.99),
'valid' stem convs, 'same' separable convs and TensorFlow's 'same' max-pooling (`MaxPool2dSame`: an even-sized input
is padded (0, 1), not (1, 1)), so with Keras' weights (`pipeline.models.weights`) it computes what Keras computes at
every input size (tests/test_keras_parity.py). `width_multiplier` and `middle_blocks` exist only to make tests fast;
the defaults are the paper's model (22,855,952 parameters with 1000 classes).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["HEAD_MODULES", "Block", "MaxPool2dSame", "SeparableConv2d", "Xception", "count_parameters", "is_head",
           "preprocess_input", "xception_macs"]

BN_EPS = 1e-3  # Keras BatchNormalization default
BN_MOMENTUM = 0.01  # = 1 - Keras momentum 0.99 (PyTorch weights the new batch, Keras the old average)


def preprocess_input(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels (B, 3, H, W) to the model's input range [-1, 1]: x / 127.5 - 1, as Keras'
    `applications.xception.preprocess_input` (the Inception convention), keeping the memory format."""
    if images.dtype != torch.uint8:
        raise TypeError(f"preprocess_input takes uint8 pixels, got {images.dtype}")
    return images.to(dtype).div_(127.5).sub_(1.0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _scaled(channels: int, width_multiplier: float) -> int:
    """Channel count scaled for small test models: a multiple of 8, at least 8 (all paper widths already are)."""
    return max(8, round(channels * width_multiplier / 8) * 8)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one spatial side: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.MaxPool2d):
    """Max-pooling with TensorFlow's 'same' padding, which depends on the input size: at stride 2 an even side is
    padded (0, 1) and an odd side (1, 1). `nn.MaxPool2d(3, 2, padding=1)` always pads (1, 1): at an even side it
    picks windows shifted by one pixel (at 299 px block 3's pool sees 74 x 74).

    The padding is -inf (never the maximum) and is computed from the static height and width only, so the module
    traces and exports with a dynamic batch (timm's `MaxPool2dSame` is the same idea).
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__(kernel_size, stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = _same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = _same_padding(x.shape[-1], self.kernel_size, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: the paper's building block.

    Nothing sits between the two convs: the paper finds that an activation there hurts (section 4.7).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_chs, in_chs, kernel_size, padding=kernel_size // 2, groups=in_chs, bias=False)
        self.pointwise = nn.Conv2d(in_chs, out_chs, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class Block(nn.Module):
    """Residual module: [ReLU ->] (SeparableConv -> BN), joined by ReLUs [-> maxpool 3x3 s2] + shortcut.

    The shortcut reads the block input before the first ReLU (as Keras), so that ReLU must not be in-place. With
    `downsample` the shortcut is a strided 1x1 conv + BN, otherwise identity (middle flow).
    """

    def __init__(self, in_chs: int, sep_chs: Sequence[int], *, start_with_relu: bool = True,
                 downsample: bool = True) -> None:
        super().__init__()
        if not downsample and sep_chs[-1] != in_chs:
            raise ValueError(f"identity shortcut needs in_chs == out_chs, got {in_chs} -> {sep_chs[-1]}")
        layers: list[nn.Module] = []
        chs = in_chs
        for i, out in enumerate(sep_chs):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv2d(chs, out), _bn(out)]
            chs = out
        if downsample:
            layers.append(MaxPool2dSame(3, stride=2))
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(in_chs, chs, 1, stride=2, bias=False), _bn(chs))
        else:
            self.shortcut = nn.Identity()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x) + self.shortcut(x)


HEAD_MODULES = ("fc_layers", "classifier")  # what `Xception` has after global pooling: the rest is the backbone


def is_head(name: str) -> bool:
    """Whether a parameter or buffer name of an `Xception` (unwrapped) belongs to its head (FC layers, classifier);
    the rest is the backbone (fine-tuning: `pipeline.models.weights`, the optimizer's backbone groups)."""
    return name.split(".", 1)[0] in HEAD_MODULES


@contextlib.contextmanager
def _keep_bn_running_stats(module: nn.Module) -> Iterator[None]:
    """Undo BatchNorm buffer updates made while checkpointing recomputes `module` in backward.

    Without this, every checkpointed training step would apply the running-average update twice.
    """
    saved = [(buf, buf.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for buf in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _checkpoint_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _keep_bn_running_stats(module)


class Xception(nn.Module):
    """The paper's Xception with a configurable head for single- or multi-label training.

    `num_classes=0` drops the logistic layer (forward returns pooled features, after any FC layers).
    `head_bias` initialises the logistic layer's bias, e.g. -log(num_classes) so that per-class sigmoids start near
    the label prior instead of 0.5 over 17,000 classes. `dropout` acts after each FC layer and before the logistic
    layer (the same place for the last FC layer, where it is applied once).
    """

    def __init__(self, num_classes: int = 1000, *, fc_layers: Sequence[int] = (), dropout: float = 0.0,
                 head_bias: float = 0.0, width_multiplier: float = 1.0, middle_blocks: int = 8,
                 checkpoint_middle_flow: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        if num_classes < 0 or middle_blocks < 0 or width_multiplier <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"invalid Xception arguments: num_classes={num_classes}, middle_blocks={middle_blocks}, "
                             f"width_multiplier={width_multiplier}, dropout={dropout}")
        self.num_classes = num_classes
        self.checkpoint_middle_flow = checkpoint_middle_flow
        c = functools.partial(_scaled, width_multiplier=width_multiplier)

        self.entry_flow = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_chans, c(32), 3, stride=2, bias=False), bn1=_bn(c(32)), act1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(c(32), c(64), 3, bias=False), bn2=_bn(c(64)), act2=nn.ReLU(inplace=True),
            block2=Block(c(64), [c(128)] * 2, start_with_relu=False),
            block3=Block(c(128), [c(256)] * 2),
            block4=Block(c(256), [c(728)] * 2),
        ))
        self.middle_flow = nn.Sequential(OrderedDict(
            (f"block{5 + i}", Block(c(728), [c(728)] * 3, downsample=False)) for i in range(middle_blocks)
        ))
        self.exit_flow = nn.Sequential(OrderedDict(
            block13=Block(c(728), [c(728), c(1024)]),
            conv3=SeparableConv2d(c(1024), c(1536)), bn3=_bn(c(1536)), act3=nn.ReLU(inplace=True),
            conv4=SeparableConv2d(c(1536), c(2048)), bn4=_bn(c(2048)), act4=nn.ReLU(inplace=True),
        ))
        self.num_features = c(2048)

        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        fcs: list[nn.Module] = []
        width = self.num_features
        for out in fc_layers:
            # Identity when dropout is off keeps state_dict keys independent of `dropout`.
            fcs += [nn.Linear(width, out), nn.ReLU(inplace=True), nn.Dropout(dropout) if dropout > 0 else nn.Identity()]
            width = out
        self.fc_layers = nn.Sequential(*fcs)
        # Dropout before the logistic layer; after an FC layer it is already the last entry of `fc_layers`.
        self.head_drop = nn.Dropout(dropout) if dropout > 0 and not fc_layers else nn.Identity()
        self.head_hidden_size = width
        self.classifier = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(head_bias)

    def _init_weights(self, head_bias: float) -> None:
        # Paper silent, Keras uses glorot_uniform: here He normal (fan_out, ReLU) for regular/pointwise convs, unit-gain
        # He normal over the 9 taps for depthwise convs (nothing nonlinear follows), glorot uniform (Keras) for Linear.
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if m.groups > 1:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, head_bias if name == "classifier" else 0.0)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) images -> (N, 2048, ~H/32, ~W/32) feature map after the last ReLU."""
        x = self.entry_flow(x)
        if self.checkpoint_middle_flow and self.training and torch.is_grad_enabled():
            for block in self.middle_flow:
                if torch.compiler.is_compiling():  # compiled recomputation does not re-run buffer updates
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    keep_stats = functools.partial(_checkpoint_contexts, block)
                    x = checkpoint(block, x, use_reentrant=False, context_fn=keep_stats)
        else:
            x = self.middle_flow(x)
        return self.exit_flow(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits (N, num_classes), or the classifier's input when `pre_logits`."""
        x = self.head_drop(self.fc_layers(self.global_pool(x)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and do not count), as the paper counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _macs_per_module(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d / Linear for one forward of `x` (BN, pooling, adds not counted)."""
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_output = module.in_features
        macs[name] = output.numel() * per_output

    handles = [m.register_forward_hook(functools.partial(hook, name)) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return macs


def xception_macs(image_size: int = 299, **kwargs: Any) -> int:
    """MACs of one forward pass of one image, for FLOPs/utilisation reports (8.357 G for the 1000-class model).

    Built and run on the meta device: shapes only, no memory or compute. `kwargs` go to `Xception`.
    """
    with torch.device("meta"):
        model = Xception(**kwargs).eval()
        x = torch.empty(1, kwargs.get("in_chans", 3), image_size, image_size)
    return sum(_macs_per_module(model, x).values())

"""Xception matches the paper (Chollet 2017, arXiv:1610.02357): parameter counts, shapes, layer structure, cost,
and every head option."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.models import Xception, count_parameters, preprocess_input, xception_macs
from pipeline.models.xception import Block, MaxPool2dSame, SeparableConv2d, _macs_per_module

TINY = {"width_multiplier": 0.125, "middle_blocks": 2}  # 8..256 channels: fast, same topology


@pytest.fixture(scope="module")
def full_model() -> Xception:
    torch.manual_seed(0)
    return Xception(num_classes=1000).eval()


def tiny(**kwargs) -> Xception:
    torch.manual_seed(0)
    return Xception(**{"num_classes": 10, **TINY, **kwargs})


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"num_classes": 1000}, 22_855_952),
    ({"num_classes": 0}, 20_806_952),
    ({"num_classes": 17000}, 55_639_952),
    ({"num_classes": 17000, "fc_layers": (4096, 4096)}, 115_629_968),
    ({"num_classes": 1000, "fc_layers": (4096, 4096)}, 50_077_968),
])
def test_parameter_counts_match_paper_table(kwargs, expected):
    with torch.device("meta"):  # same modules as on CPU, without allocating 115M parameters
        model = Xception(**kwargs)
    assert count_parameters(model) == expected


def test_count_parameters_on_cpu_and_skips_frozen(full_model):
    assert count_parameters(full_model) == 22_855_952
    frozen = tiny()
    total = count_parameters(frozen)
    for p in frozen.classifier.parameters():
        p.requires_grad_(False)
    assert count_parameters(frozen) == total - frozen.classifier.weight.numel() - frozen.classifier.bias.numel()


def test_feature_map_shapes_at_299(full_model):
    shapes: dict[str, tuple[int, ...]] = {}
    watched = {**{f"entry.{n}": m for n, m in full_model.entry_flow.named_children()},
               "entry_flow": full_model.entry_flow, "middle_flow": full_model.middle_flow,
               "exit.block13": full_model.exit_flow.block13, "exit_flow": full_model.exit_flow}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
               for name, m in watched.items()]
    with torch.no_grad():
        features = full_model.forward_features(torch.randn(1, 3, 299, 299))
        logits = full_model.forward_head(features)
    for h in handles:
        h.remove()
    assert shapes["entry.conv1"] == (32, 149, 149)
    assert shapes["entry.conv2"] == (64, 147, 147)
    assert shapes["entry.block2"] == (128, 74, 74)
    assert shapes["entry.block3"] == (256, 37, 37)
    assert shapes["entry_flow"] == shapes["entry.block4"] == (728, 19, 19)
    assert shapes["middle_flow"] == (728, 19, 19)
    assert shapes["exit.block13"] == (1024, 10, 10)
    assert shapes["exit_flow"] == (2048, 10, 10)
    assert features.shape == (1, 2048, 10, 10)
    assert features.min() >= 0  # forward_features ends with the last ReLU
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_smallest_input_71(full_model):
    with torch.no_grad():
        features = full_model.forward_features(torch.randn(1, 3, 71, 71))
        logits = full_model.forward_head(features)
    assert features.shape == (1, 2048, 3, 3)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_separable_convs_are_depthwise_then_pointwise(full_model):
    seps = [m for m in full_model.modules() if isinstance(m, SeparableConv2d)]
    assert len(seps) == 34  # 2 + 2 + 2 (blocks 2-4) + 8 * 3 (middle) + 2 (block 13) + 2 (exit)
    for sep in seps:
        assert list(sep.children()) == [sep.depthwise, sep.pointwise]
        dw, pw = sep.depthwise, sep.pointwise
        assert dw.groups == dw.in_channels == dw.out_channels  # depth multiplier 1
        assert dw.kernel_size == (3, 3) and dw.padding == (1, 1) and dw.stride == (1, 1)
        assert pw.kernel_size == (1, 1) and pw.groups == 1 and pw.in_channels == dw.out_channels
    assert all(m.bias is None for m in full_model.modules() if isinstance(m, nn.Conv2d))


def test_pointwise_consumes_depthwise_output_unchanged():
    model = tiny().eval()
    seen: dict[int, list] = {}
    handles = []
    for sep in (m for m in model.modules() if isinstance(m, SeparableConv2d)):
        record = seen.setdefault(id(sep), [])
        handles.append(sep.depthwise.register_forward_hook(lambda _m, _i, out, r=record: r.append(out)))
        handles.append(sep.pointwise.register_forward_pre_hook(lambda _m, inp, r=record: r.append(inp[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, 71, 71))
    for h in handles:
        h.remove()
    assert len(seen) == 2 + 2 + 2 + TINY["middle_blocks"] * 3 + 2 + 2
    for depthwise_out, pointwise_in in seen.values():
        assert pointwise_in is depthwise_out  # no BN, activation or anything else in between


def test_conv_and_batchnorm_counts(full_model):
    convs = [m for m in full_model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1) and m.stride == (2, 2)]
    regular = [m for m in convs if m.kernel_size == (3, 3) and m.groups == 1]
    assert len(depthwise) == 34 and len(shortcuts) == 4 and len(regular) == 2
    assert len(regular) + len(depthwise) == 36  # the paper's 36 conv layers (a separable conv counts once)
    assert len(convs) == 2 + 34 * 2 + 4
    stem = full_model.entry_flow
    assert (stem.conv1.stride, stem.conv1.padding, stem.conv2.stride, stem.conv2.padding) == ((2, 2), (0, 0),
                                                                                            (1, 1), (0, 0))
    bns = [m for m in full_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 40
    assert all(type(m) is nn.BatchNorm2d and m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    pools = [m for m in full_model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(type(p) is MaxPool2dSame and (p.kernel_size, p.stride) == (3, 2) for p in pools)


def test_block_layout_and_relu_placement(full_model):
    entry, exit_ = full_model.entry_flow, full_model.exit_flow
    assert isinstance(entry.block2.layers[0], SeparableConv2d)  # no ReLU before block2's first separable conv
    for block in [entry.block3, entry.block4, *full_model.middle_flow, exit_.block13]:
        assert isinstance(block.layers[0], nn.ReLU)
    middle = full_model.middle_flow[0]
    assert [type(m) for m in middle.layers] == [nn.ReLU, SeparableConv2d, nn.BatchNorm2d] * 3
    assert isinstance(middle.shortcut, nn.Identity)
    assert [m.pointwise.out_channels for m in exit_.modules() if isinstance(m, SeparableConv2d)] == [728, 1024,
                                                                                                  1536, 2048]
    assert len(full_model.middle_flow) == 8


def test_shortcut_reads_input_before_first_relu():
    torch.manual_seed(0)
    for block in [Block(16, [16] * 3, downsample=False), Block(16, [32, 32])]:
        block.eval()
        x = torch.randn(2, 16, 9, 9)  # has negatives: an in-place first ReLU would change the shortcut's input
        expected = block.layers(x.clone()) + block.shortcut(x.clone())
        assert torch.equal(block(x), expected)
        assert not torch.equal(block(x), block.layers(x.clone()) + block.shortcut(torch.relu(x)))


@pytest.mark.parametrize("fc_layers", [(), (16, 16)])
def test_dropout_acts_in_train_mode_only(fc_layers):
    model = tiny(fc_layers=fc_layers, dropout=0.5)
    reference = tiny(fc_layers=fc_layers)
    reference.load_state_dict(model.state_dict())  # same keys with and without dropout
    x = torch.randn(2, 3, 71, 71)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == max(1, len(fc_layers)) and all(d.p == 0.5 for d in drops)
    calls = []
    for d in drops:
        d.register_forward_hook(lambda m, i, o: calls.append(m))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))
        out = model.train()(x)
        assert len(calls) == 2 * len(drops)  # every dropout runs once per forward
        assert not torch.allclose(out, reference.train()(x))  # used, not computed and thrown away (timm's bug)
        assert not torch.allclose(out, model(x))  # a fresh mask each call


def test_head_bias_initialises_classifier_bias_only():
    bias = -math.log(17000)
    model = tiny(fc_layers=(16,), head_bias=bias)
    assert torch.all(model.classifier.bias == bias)
    assert torch.all(model.fc_layers[0].bias == 0)
    with torch.no_grad():
        model.classifier.weight.zero_()
    assert torch.allclose(model.eval()(torch.randn(1, 3, 71, 71)), torch.full((1, 10), bias))
    assert torch.all(tiny().classifier.bias == 0)


def test_checkpoint_middle_flow_matches_plain_forward_and_backward():
    plain = tiny(num_classes=5).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_middle_flow = True
    assert Xception(**TINY, checkpoint_middle_flow=True).checkpoint_middle_flow
    block_calls = []
    for block in ckpt.middle_flow:
        block.register_forward_pre_hook(lambda m, i: block_calls.append(m))
    x = torch.randn(2, 3, 71, 71)
    out_plain, out_ckpt = plain(x), ckpt(x)
    assert torch.equal(out_plain, out_ckpt)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    assert len(block_calls) == 2 * TINY["middle_blocks"]  # recomputed in backward: checkpointing really happened
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    # recomputation must not apply BatchNorm's running-average update a second time
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_width_multiplier_and_middle_blocks_shrink_the_model():
    model = Xception(num_classes=7, width_multiplier=0.25, middle_blocks=1)
    assert len(model.middle_flow) == 1 and model.num_features == 512
    assert count_parameters(model) < count_parameters(tiny(middle_blocks=2, width_multiplier=0.5)) < 3_000_000
    assert all(m.out_channels % 8 == 0 and m.out_channels >= 8 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert tiny(width_multiplier=0.01).num_features == 24  # 2048 * 0.01 -> 20.48 -> multiple of 8
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 71, 71)).shape == (1, 7)
        shallow = Xception(num_classes=3, width_multiplier=0.125, middle_blocks=0).eval()
        assert shallow(torch.randn(1, 3, 71, 71)).shape == (1, 3)


def test_backbone_only_returns_pooled_features():
    model = tiny(num_classes=0).eval()
    assert isinstance(model.classifier, nn.Identity)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_features(x).mean(dim=(2, 3)), atol=1e-6)
    assert model(x).shape == (2, model.num_features)


def test_forward_head_pre_logits_and_in_chans():
    model = tiny(fc_layers=(24, 16), in_chans=1).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 1, 71, 71))
        hidden = model.forward_head(features, pre_logits=True)
        assert hidden.shape == (2, 16) and hidden.min() >= 0  # after the last FC's ReLU
        assert torch.equal(model.forward_head(features), model.classifier(hidden))


def test_init_is_the_documented_scheme(full_model):
    dw = full_model.middle_flow.block5.layers[1].depthwise.weight
    pw = full_model.middle_flow.block5.layers[1].pointwise.weight
    assert dw.std().item() == pytest.approx(1 / 3, rel=0.05)  # unit gain over the 9 taps
    assert pw.std().item() == pytest.approx(math.sqrt(2 / 728), rel=0.05)  # He normal, fan_out
    limit = math.sqrt(6 / (2048 + 1000))  # glorot uniform
    w = full_model.classifier.weight
    assert w.abs().max().item() <= limit and w.abs().max().item() > 0.99 * limit
    assert torch.all(full_model.classifier.bias == 0)


def test_macs_match_paper():
    macs = xception_macs(299, num_classes=1000)
    assert macs == pytest.approx(8.357e9, rel=0.01)
    assert xception_macs(299, num_classes=17000) - macs == 16000 * 2048  # the logistic layer, once per image
    assert xception_macs(71) < macs / 10
    with torch.device("meta"):
        model = Xception(num_classes=1000).eval()
        per_module = _macs_per_module(model, torch.empty(1, 3, 299, 299))
    pointwise = sum(v for k, v in per_module.items() if k.endswith(".pointwise"))
    assert sum(per_module.values()) == macs
    assert pointwise / macs == pytest.approx(0.91, abs=0.01)  # the paper's cost split: ~91% in pointwise convs


def test_preprocess_input_maps_pixels_to_the_inception_range() -> None:
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    x = preprocess_input(pixels)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0])
    assert preprocess_input(pixels, torch.bfloat16).dtype == torch.bfloat16
    assert pixels[0, 2, 0, 0] == 255  # the caller's pixels are left alone
    with pytest.raises(TypeError, match="uint8"):
        preprocess_input(x)


@pytest.mark.parametrize("size", [4, 5, 6, 7, 74, 75])
def test_same_max_pooling_pads_as_tensorflow(size):
    """TF 'same' at stride 2: out = ceil(n / 2), total padding (out - 1) * 2 + 3 - n, the odd pixel after. Written
    out here window by window (numpy), independently of the module's padding arithmetic."""
    import numpy as np

    x = torch.randn(2, 3, size, size + 1)
    out = MaxPool2dSame(3, stride=2)(x)

    def windows(n):
        count = -(-n // 2)
        before = max((count - 1) * 2 + 3 - n, 0) // 2
        return [range(max(2 * i - before, 0), min(2 * i - before + 3, n)) for i in range(count)]

    a = x.numpy()
    expected = np.array([[[[a[b, c][np.ix_(list(r), list(q))].max() for q in windows(size + 1)]
                           for r in windows(size)] for c in range(3)] for b in range(2)])
    assert out.shape == expected.shape
    assert np.array_equal(out.numpy(), expected)
    if size % 2 == 0:  # PyTorch's symmetric padding picks other windows here
        assert not torch.equal(nn.MaxPool2d(3, 2, padding=1)(x)[..., :, 0], out[..., :, 0])


def test_same_max_pooling_exports_with_a_dynamic_batch():
    pool = MaxPool2dSame(3, stride=2)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(pool, (torch.randn(2, 4, 74, 75),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 4, 74, 75)
    assert torch.equal(program.module()(x), pool(x))

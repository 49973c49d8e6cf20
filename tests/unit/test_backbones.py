"""Backbone registry: one contract test over every registered backbone, plus registry behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from sap_lightning.backbones import (
    BackboneSpec,
    create_backbone,
    get_spec,
    in_memory_format,
    list_backbones,
    register_backbone,
)
from sap_lightning.core.errors import ConfigError

# Small configurations that keep the contract test fast on one CPU core; a backbone missing
# here is tested with its defaults.
SMALL_KWARGS = {
    # One Swin block per stage instead of two: the same kinds of layers, a third of the time.
    "swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1)},
    # Residual blocks, so the input block's 1x1x1 projection (an input-projection key) exists.
    "dynunet": {
        "kernel_size": (3, 3, 3),
        "strides": (1, 2, 2),
        "filters": (4, 8, 16),
        "res_block": True,
    },
    "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "unet_tiny": {},
    # ResEnc with the preset's rule (2x width per stage) at tiny widths, two blocks in the
    # second stage so the residual projection of a strided block exists.
    "resenc_unet": {
        "features_per_stage": (4, 8, 16, 32),
        "n_blocks_per_stage": (1, 2, 1, 1),
        "n_conv_per_stage_decoder": (1, 1, 1),
        "kernel_sizes": (3, 3, 3, 3),
        "strides": (1, 2, 2, 2),
    },
}
IN_CHANNELS, OUT_CHANNELS = 2, 3

try:
    import dynamic_network_architectures  # noqa: F401

    HAS_DNA = True
except ImportError:  # the ResEnc U-Net's package is installed separately (--no-deps)
    HAS_DNA = False
needs_dna = pytest.mark.skipif(not HAS_DNA, reason="dynamic-network-architectures not installed")
BACKBONES = [
    pytest.param(name, marks=needs_dna) if name == "resenc_unet" else name
    for name in list_backbones()
]


def test_builtins_are_registered():
    assert set(list_backbones()) >= {"swin_unetr", "dynunet", "segresnet", "unet_tiny"}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_contract(name):
    torch.manual_seed(0)
    kwargs = SMALL_KWARGS.get(name, {})
    spec = get_spec(name)
    model = create_backbone(name, IN_CHANNELS, OUT_CHANNELS, **kwargs)
    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()

    # Forward / backward at the smallest valid size: the required multiple, doubled along one
    # axis because instance normalisation rejects a single-voxel bottleneck in training.
    multiple = spec.input_multiple(kwargs)
    x = torch.randn(1, IN_CHANNELS, multiple, multiple, 2 * multiple)
    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, OUT_CHANNELS, *x.shape[2:])
    logits.square().mean().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not without_grad, f"parameters outside the forward graph: {without_grad[:5]}"

    # Encoder prefixes name real parameters, and encoder, head and decoder are all non-empty.
    for prefix in spec.encoder_prefixes:
        assert any(key.startswith(prefix) for key in params), f"{prefix} matches no parameter"
    decoder = [k for k in params if not spec.is_encoder_key(k) and not spec.is_head_key(k)]
    assert decoder, "the spec leaves no decoder"
    assert not any(spec.is_encoder_key(key) for key in spec.head_keys)

    # Input projection: every listed weight takes the image's channels.
    for key in spec.input_projection_keys:
        assert key in params, f"input-projection key {key} is not a parameter"
        assert params[key].shape[1] == IN_CHANNELS
    # Head: a 1x1x1 convolution with one output per class.
    weight_key, bias_key = spec.head_keys
    assert state[weight_key].shape == (OUT_CHANNELS, state[weight_key].shape[1], 1, 1, 1)
    assert state[bias_key].shape == (OUT_CHANNELS,)

    # Bottleneck: the declared channels at the declared downsampling factor.
    stride = spec.bottleneck_stride(kwargs)
    with torch.no_grad():
        features = spec.bottleneck(model, x)
    expected_spatial = tuple(size // stride for size in x.shape[2:])
    assert features.shape == (1, spec.bottleneck_channels(kwargs), *expected_spatial)
    assert not spec.deep_supervision(kwargs)


@pytest.mark.parametrize("name", BACKBONES)
def test_channels_last_gives_the_same_logits_and_gradients(name):
    """``model.channels_last``: the same network in the channels-last 3D layout computes the
    same function (up to float rounding) and trains the same weights."""
    kwargs = SMALL_KWARGS.get(name, {})
    multiple = get_spec(name).input_multiple(kwargs)
    x = torch.randn(1, IN_CHANNELS, multiple, multiple, 2 * multiple)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = in_memory_format(
            create_backbone(name, IN_CHANNELS, OUT_CHANNELS, **kwargs), channels_last
        )
        weights = [p for p in model.parameters() if p.dim() == 5]
        assert all(
            p.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
            or p.is_contiguous()  # a kernel of one voxel is contiguous in both layouts
            for p in weights
        )
        if channels_last:  # a 3x3x3 kernel over several channels is laid out otherwise
            assert any(not p.is_contiguous() for p in weights)
        logits = model(x)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (plain, plain_grads), (last, last_grads) = results
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)
    for got, want in zip(last_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_swin_unetr_defaults_are_the_papers():
    spec = get_spec("swin_unetr")
    kwargs = spec.resolve_kwargs()
    assert kwargs["feature_size"] == 48
    assert kwargs["drop_rate"] == kwargs["attn_drop_rate"] == kwargs["dropout_path_rate"] == 0.1
    assert kwargs["spatial_dims"] == 3
    assert "img_size" not in kwargs
    assert spec.input_multiple() == 32
    assert spec.bottleneck_channels() == 768
    assert spec.bottleneck_stride() == 32
    model = create_backbone("swin_unetr", 2, 10)
    n_params = sum(p.numel() for p in model.parameters())
    assert 61.5e6 < n_params < 62.5e6  # the paper: about 62 M
    assert model.swinViT.layers4[0].blocks[0].attn.qkv.in_features == 8 * 48
    assert tuple(model.swinViT.layers1[0].blocks[0].window_size) == (7, 7, 7)


def test_swin_unetr_attention_window_is_configurable():
    """``window_size`` reaches every Swin block (smaller windows make CPU tests cheaper)."""
    model = create_backbone("swin_unetr", 2, 2, feature_size=12, depths=(1, 1, 1, 1), window_size=4)
    layers = [model.swinViT.layers1, model.swinViT.layers2, model.swinViT.layers3]
    assert all(tuple(layer[0].blocks[0].window_size) == (4, 4, 4) for layer in layers)
    out = model(torch.zeros(1, 2, 64, 64, 64))
    assert out.shape == (1, 2, 64, 64, 64)


def test_unet_tiny_is_tiny():
    model = create_backbone("unet_tiny", 2, 10)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert get_spec("unet_tiny").input_multiple() in (8, 16)


@pytest.mark.parametrize("name", BACKBONES)
def test_kwargs_survive_a_json_round_trip(name):
    """Configs and checkpoint metadata hold lists, not tuples; the build must not care."""
    spec = get_spec(name)
    resolved = spec.resolve_kwargs(SMALL_KWARGS.get(name, {}))
    from_json = json.loads(json.dumps(resolved))
    a = create_backbone(name, 2, 3, **resolved).state_dict()
    b = create_backbone(name, 2, 3, **from_json).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_unknown_kwarg_names_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        create_backbone("unet_tiny", 1, 2, feature_size=8)
    message = str(err.value)
    assert "feature_size" in message and "unet_tiny" in message
    for valid in get_spec("unet_tiny").default_kwargs:
        assert valid in message


def test_unknown_backbone_names_the_available_ones():
    with pytest.raises(ConfigError, match="swin_unetr") as err:
        create_backbone("swin_unter", 1, 2)
    assert "unet_tiny" in str(err.value)


def test_registering_a_duplicate_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("unet_tiny", get_spec("unet_tiny"))(lambda i, o, **kw: None)
    # The built-in is untouched.
    assert create_backbone("unet_tiny", 1, 2).final_conv.out_channels == 2


def test_default_kwargs_cannot_be_mutated():
    spec = get_spec("unet_tiny")
    with pytest.raises(TypeError):
        spec.default_kwargs["features"] = (1, 1, 1, 1, 1, 1)


def test_dynunet_deep_supervision_heads_count_as_head():
    kwargs = {**SMALL_KWARGS["dynunet"], "deep_supervision": True}
    spec = get_spec("dynunet")
    assert spec.deep_supervision(kwargs)
    model = create_backbone("dynunet", 1, 4, **kwargs)
    aux = [k for k in model.state_dict() if k.startswith("deep_supervision_heads.")]
    assert aux and all(spec.is_head_key(k) for k in aux)


def test_dynunet_anisotropic_strides_multiple():
    spec = get_spec("dynunet")
    kwargs = {"kernel_size": (3, 3, 3), "strides": ((1, 1, 1), (2, 2, 1), (2, 2, 2))}
    # Total strides per axis are (4, 4, 2); 4 is a valid size multiple along every axis.
    assert spec.input_multiple(kwargs) == 4
    assert spec.bottleneck_channels(kwargs) == 128  # nnU-Net filters 32, 64, 128


def test_segresnet_refuses_mismatched_stages():
    with pytest.raises(ConfigError, match="blocks_up"):
        create_backbone("segresnet", 1, 2, blocks_down=(1, 1, 1), blocks_up=(1,))


def test_spec_is_frozen():
    spec = get_spec("swin_unetr")
    assert isinstance(spec, BackboneSpec)
    with pytest.raises(AttributeError):
        spec.head_keys = ()


# --------------------------------------------------------------------------- ResEnc U-Net


@needs_dna
def test_resenc_defaults_are_nnunets_resenc_ml_3d_preset():
    """The same tensors as nnU-Net's planner builds for ResEnc-M/L on an isotropic 3D patch
    (reference: ResidualEncoderUNet called with the planner's arch_kwargs directly)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from torch import nn

    spec = get_spec("resenc_unet")
    assert spec.bottleneck_channels() == 320 and spec.input_multiple() == 32
    ours = create_backbone("resenc_unet", 2, 10).state_dict()
    reference_net = ResidualEncoderUNet(
        input_channels=2,
        n_stages=6,
        features_per_stage=[min(320, 32 * 2**i) for i in range(6)],
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        n_blocks_per_stage=(1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)[:6],
        num_classes=10,
        n_conv_per_stage_decoder=(1,) * 5,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    reference = reference_net.state_dict()
    # Without deep supervision only the last segmentation layer exists (also as ``head``).
    unused = {f"decoder.seg_layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    expected = {k: v.shape for k, v in reference.items() if k not in unused}
    expected |= {"head.weight": reference["decoder.seg_layers.4.weight"].shape}
    expected |= {"head.bias": reference["decoder.seg_layers.4.bias"].shape}
    assert {k: v.shape for k, v in ours.items()} == expected
    n_params = sum(p.numel() for p in reference_net.parameters())
    assert 95e6 < n_params < 110e6  # ResEnc-L/M 3D: about 102 M parameters


@needs_dna
def test_resenc_deep_supervision_stacks_full_size_outputs():
    kwargs = {**SMALL_KWARGS["resenc_unet"], "deep_supervision": True}
    spec = get_spec("resenc_unet")
    model = create_backbone("resenc_unet", 1, 4, **kwargs)
    x = torch.randn(1, 1, 8, 8, 16)
    model.train()
    out = model(x)
    assert out.shape == (1, 3, 4, 8, 8, 16)  # one output per decoder stage, full size
    aux = [k for k in model.state_dict() if k.startswith("decoder.seg_layers.")]
    assert len(aux) == 6 and all(spec.is_head_key(k) for k in aux)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 4, 8, 8, 16)


@needs_dna
def test_resenc_loads_an_nnunet_trained_state_dict():
    """An nnU-Net checkpoint (deep supervision on during training) transfers all but the head."""
    from sap_lightning.backbones.transfer import transfer_weights

    kwargs = SMALL_KWARGS["resenc_unet"]
    nnunet = create_backbone("resenc_unet", 2, 5, **kwargs, deep_supervision=True)
    state = {k: v for k, v in nnunet.state_dict().items() if not k.startswith("head.")}
    model = create_backbone("resenc_unet", 2, 3, **kwargs)
    report = transfer_weights(model, state, mode="all_but_head", spec="resenc_unet")
    for key in (
        "encoder.stages.1.blocks.0.conv1.conv.weight",
        "decoder.stages.0.convs.0.conv.weight",
    ):
        assert key in report.loaded
        assert torch.equal(model.state_dict()[key], state[key])
    assert not report.missing and not report.mismatched
    assert not any(k.startswith("decoder.seg_layers.") for k in report.loaded)
    assert {"decoder.seg_layers.0.weight", "decoder.seg_layers.2.weight"} <= set(
        report.unused_source_keys
    )


def test_resenc_refuses_mismatched_stage_lists():
    if not HAS_DNA:
        pytest.skip("dynamic-network-architectures not installed")
    with pytest.raises(ConfigError, match="n_blocks_per_stage has 2 entries, needs 4"):
        create_backbone(
            "resenc_unet", 1, 2, **{**SMALL_KWARGS["resenc_unet"], "n_blocks_per_stage": (1, 1)}
        )

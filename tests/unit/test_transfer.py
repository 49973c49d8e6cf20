"""Weight transfer: export, strict loading, prefixes, aliases, channel adaptation, safety."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sap_lightning.backbones import create_backbone, get_spec, list_backbones
from sap_lightning.backbones.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    export_backbone,
    load_checkpoint_file,
    make_backbone_meta,
    summarize_checkpoint,
)
from sap_lightning.backbones.transfer import (
    NEW_CHANNEL_RULE,
    adapt_input_channels,
    transfer_weights,
)
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.io import read_json
from sap_lightning.modules.optim import param_groups

SMALL_KWARGS = {
    "swin_unetr": {"feature_size": 12},
    "dynunet": {"kernel_size": (3, 3, 3), "strides": (1, 2, 2), "filters": (4, 8, 16)},
    "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "unet_tiny": {},
    "resenc_unet": {
        "features_per_stage": (4, 8, 16, 32),
        "n_blocks_per_stage": (1, 2, 1, 1),
        "n_conv_per_stage_decoder": (1, 1, 1),
        "kernel_sizes": (3, 3, 3, 3),
        "strides": (1, 2, 2, 2),
    },
}


class NotAllowedInCheckpoints:
    """Any custom class: unpickling it would need arbitrary code, so loading must refuse."""

    def __init__(self) -> None:
        self.value = 3


class LitLike(nn.Module):
    """The attribute layout of the library's LightningModules: network ``net`` + extra heads."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.rotation_head = nn.Linear(8, 4)


def build(name: str, in_channels: int, out_channels: int, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_backbone(name, in_channels, out_channels, **{**SMALL_KWARGS[name], **kwargs})


def trained_like(model: nn.Module) -> nn.Module:
    """Perturb every float tensor so no copied value can equal a fresh initialisation."""
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.5)
    return model


def meta_for(name: str, in_channels: int, out_channels: int, task: str) -> dict:
    return make_backbone_meta(
        backbone=name,
        backbone_kwargs=SMALL_KWARGS[name],
        in_channels=in_channels,
        out_channels=out_channels,
        task=task,
        channel_names=["T1", "b1000"][:in_channels],
        label_names={"background": 0, "lesion": 1} if out_channels == 2 else None,
        spacing=(np.float64(1.5), 1.5, 5.0),
        normalisation={"clip_percentiles": [1, 99], "range": [0, 1]},
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list_backbones())
def test_all_but_head_copies_every_tensor_but_the_head(name, tmp_path):
    spec = get_spec(name)
    skeleton = trained_like(build(name, 2, 10, seed=0))
    path = export_backbone(skeleton, tmp_path / "skeleton.pt", meta_for(name, 2, 10, "skeleton"))
    lesion = build(name, 2, 2, seed=1)
    fresh = snapshot(lesion)

    report = transfer_weights(
        lesion, path, mode="all_but_head", spec=name, expected_task="skeleton"
    )

    source, after = skeleton.state_dict(), lesion.state_dict()
    for key, value in after.items():
        if spec.is_head_key(key):
            assert torch.equal(value, fresh[key]), f"head {key} changed"
        else:
            assert torch.equal(value, source[key]), f"{key} not copied exactly"
            if value.is_floating_point():
                assert not torch.equal(value, fresh[key])
    # A module may list one tensor under two names (an alias such as ResEnc's ``head.*``):
    # compare the tensors the names stand for.
    lesion_tensors = lesion.state_dict(keep_vars=True)
    skeleton_tensors = skeleton.state_dict(keep_vars=True)

    def tensors(state, keys) -> set[int]:
        return {id(state[key]) for key in keys}

    assert tensors(lesion_tensors, report.skipped) == tensors(lesion_tensors, spec.head_keys)
    assert not report.adapted and not report.missing and not report.mismatched
    assert len(report.loaded) + len(report.skipped) == len({id(t) for t in lesion_tensors.values()})
    assert tensors(skeleton_tensors, report.unused_source_keys) == tensors(
        skeleton_tensors, spec.head_keys
    )
    assert report.source_meta["task"] == "skeleton"


def test_encoder_mode_copies_only_the_encoder(tmp_path):
    name = "swin_unetr"
    spec = get_spec(name)
    pretrained = trained_like(build(name, 2, 2, seed=0))
    path = export_backbone(pretrained, tmp_path / "ssl.pt", meta_for(name, 2, 2, "ssl"))
    model = build(name, 2, 2, seed=1)
    before = snapshot(model)

    report = transfer_weights(model, path, mode="encoder", spec=name, expected_task="ssl")

    after, source = model.state_dict(), pretrained.state_dict()
    n_encoder = 0
    for key, value in after.items():
        if spec.is_encoder_key(key):
            n_encoder += 1
            assert torch.equal(value, source[key]), key
        else:
            assert torch.equal(value, before[key]), f"non-encoder {key} changed"
    assert n_encoder == len(report.loaded)
    assert all(spec.is_encoder_key(key) for key in report.loaded)
    assert any(key.startswith("decoder1.") for key in report.skipped)
    assert "out.conv.conv.weight" in report.skipped


def test_wrong_prefixes_fail_loudly():
    target = build("unet_tiny", 1, 2, seed=0)
    renamed = {
        f"backbone_{key}": value for key, value in build("unet_tiny", 1, 2, 1).state_dict().items()
    }
    with pytest.raises(CheckpointError, match="no source key matches the model"):
        transfer_weights(target, renamed, spec="unet_tiny")
    # Another architecture's weights match nothing either.
    with pytest.raises(CheckpointError, match="no source key matches"):
        transfer_weights(target, build("segresnet", 1, 2, seed=0), spec="unet_tiny", strict=False)


def test_a_source_that_only_matches_the_head_loads_nothing_and_fails():
    target = build("unet_tiny", 1, 2, seed=0)
    head_only = {k: v for k, v in build("unet_tiny", 1, 2, 1).state_dict().items() if "final" in k}
    with pytest.raises(CheckpointError, match="could be loaded"):
        transfer_weights(target, head_only, spec="unet_tiny", strict=False)


def test_strict_names_missing_and_mismatched_keys():
    target = build("unet_tiny", 1, 2, seed=0)
    source = build("unet_tiny", 1, 2, seed=1).state_dict()
    del source["down_2.convs.conv_0.conv.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing: down_2\.convs\.conv_0\.conv\.weight"):
        transfer_weights(target, source, spec="unet_tiny")

    before = snapshot(target)
    report = transfer_weights(target, source, spec="unet_tiny", strict=False)
    assert report.missing == ["down_2.convs.conv_0.conv.weight"]
    assert torch.equal(
        target.state_dict()["down_2.convs.conv_0.conv.weight"],
        before["down_2.convs.conv_0.conv.weight"],
    )
    assert torch.equal(
        target.state_dict()["down_1.convs.conv_0.conv.weight"],
        source["down_1.convs.conv_0.conv.weight"],
    )

    wider = build("unet_tiny", 1, 2, seed=1, features=(8, 16, 32, 64, 128, 16)).state_dict()
    with pytest.raises(
        CheckpointError, match=r"down_4\.convs\.conv_0\.conv\.weight \(source \(128, 64"
    ):
        transfer_weights(target, wider, spec="unet_tiny")


def test_full_mode_with_another_label_set_names_the_head():
    with pytest.raises(CheckpointError, match=r"final_conv\.weight \(source \(10, 16, 1, 1, 1\)"):
        transfer_weights(build("unet_tiny", 1, 2, 0), build("unet_tiny", 1, 10, 1), mode="full")


@pytest.mark.parametrize("source_channels, target_channels", [(1, 2), (2, 1)])
def test_input_channel_adaptation(source_channels, target_channels):
    spec = get_spec("unet_tiny")
    (key,) = spec.input_projection_keys
    source = trained_like(build("unet_tiny", source_channels, 10, seed=0))
    target = build("unet_tiny", target_channels, 2, seed=1)

    report = transfer_weights(target, source, spec="unet_tiny")

    assert report.adapted == [key]
    w_source, w_target = source.state_dict()[key], target.state_dict()[key]
    if (source_channels, target_channels) == (1, 2):
        # One channel's kernel, shared by both inputs at half strength.
        assert torch.allclose(w_target, torch.cat([w_source / 2, w_source / 2], dim=1))
    else:
        # Both channels' kernels summed into the single input.
        assert torch.allclose(w_target, w_source[:, :1] + w_source[:, 1:])
    # Activation scale is kept: an image replicated over the channels gives the same response.
    image = torch.randn(1, 1, 8, 8, 8)
    response_source = F.conv3d(image.expand(1, source_channels, 8, 8, 8), w_source, padding=1)
    response_target = F.conv3d(image.expand(1, target_channels, 8, 8, 8), w_target, padding=1)
    assert torch.allclose(response_source, response_target, atol=1e-5)
    # Everything else is copied unchanged.
    assert torch.equal(
        target.state_dict()["down_1.convs.conv_0.conv.weight"],
        source.state_dict()["down_1.convs.conv_0.conv.weight"],
    )

    with pytest.raises(CheckpointError, match=rf"{key}.*{source_channels} input channel"):
        transfer_weights(target, source, spec="unet_tiny", in_channel_policy="error")


def _exported(tmp_path, model: nn.Module, names: list[str], out_channels: int = 10):
    meta = meta_for("unet_tiny", len(names), out_channels, "skeleton")
    meta["channel_names"] = names
    return export_backbone(model, tmp_path / "source.pt", meta)


def test_a_new_channel_starts_at_zero_and_the_function_is_unchanged(tmp_path):
    """T1 + b1000 pretraining into a T1 + b1000 + ADC network (``by_name``): the two kernels
    are copied, ADC's is zero, so the new network on (T1, b1000, any ADC) computes what the
    pretrained one computes on (T1, b1000)."""
    (key,) = get_spec("unet_tiny").input_projection_keys
    source = trained_like(build("unet_tiny", 2, 10, seed=0))
    path = _exported(tmp_path, source, ["T1", "b1000"])
    target = build("unet_tiny", 3, 10, seed=1)
    report = transfer_weights(
        target,
        path,
        mode="full",
        in_channel_policy="by_name",
        channel_names=["T1", "b1000", "ADC"],
    )
    assert report.adapted == [key] and not report.missing and not report.mismatched
    assert report.channels == {
        "source": ["T1", "b1000"],
        "model": ["T1", "b1000", "ADC"],
        "new": ["ADC"],
        "rule": NEW_CHANNEL_RULE,
    }
    assert "new input channel(s) ADC start at zero" in report.summary()
    weight, pretrained = target.state_dict()[key], source.state_dict()[key]
    assert torch.equal(weight[:, :2], pretrained) and not weight[:, 2].any()
    image = torch.rand(1, 3, 32, 32, 32)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(image), source(image[:, :2]), rtol=0, atol=1e-6)


def test_channels_are_matched_by_name_not_position(tmp_path):
    (key,) = get_spec("unet_tiny").input_projection_keys
    source = trained_like(build("unet_tiny", 2, 10, seed=0))
    path = _exported(tmp_path, source, ["T1", "b1000"])
    target = build("unet_tiny", 3, 10, seed=1)
    report = transfer_weights(
        target, path, in_channel_policy="by_name", channel_names=["ADC", "b1000", "T1"]
    )
    weight, pretrained = target.state_dict()[key], source.state_dict()[key]
    assert report.channels is not None and report.channels["new"] == ["ADC"]
    assert not weight[:, 0].any()
    assert torch.equal(weight[:, 1], pretrained[:, 1]) and torch.equal(
        weight[:, 2], pretrained[:, 0]
    )


def test_by_name_refuses_what_it_cannot_match_in_one_line(tmp_path):
    source = trained_like(build("unet_tiny", 2, 10, seed=0))
    path = _exported(tmp_path, source, ["T1", "b1000"])
    target = build("unet_tiny", 2, 10, seed=1)
    with pytest.raises(CheckpointError, match=r"\['b1000'\] cannot be matched") as caught:
        transfer_weights(target, path, in_channel_policy="by_name", channel_names=["T1", "ADC"])
    assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="by_name needs both sides' channel names"):
        transfer_weights(build("unet_tiny", 3, 10, seed=1), path, in_channel_policy="by_name")
    # The same names: a plain copy, nothing adapted.
    report = transfer_weights(
        target, path, in_channel_policy="by_name", channel_names=["T1", "b1000"]
    )
    assert report.channels is None and not report.adapted


def test_swin_adapts_every_input_projection():
    spec = get_spec("swin_unetr")
    report = transfer_weights(
        build("swin_unetr", 2, 2, 1), build("swin_unetr", 1, 10, 0), spec=spec
    )
    assert sorted(report.adapted) == sorted(spec.input_projection_keys)


def test_adapt_input_channels_worked_values():
    weight = torch.tensor([[[[[1.0]]], [[[3.0]]]]])  # (out=1, in=2, 1, 1, 1)
    assert adapt_input_channels(weight, 1).flatten().tolist() == [4.0]
    assert adapt_input_channels(weight, 4).flatten().tolist() == [1.0, 1.0, 1.0, 1.0]


def save_lightning_layout(path, net: nn.Module, meta: dict | None, prefix: str = "net.") -> None:
    """The dict a Lightning Trainer writes for a module holding the network as ``self.net``."""
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state["rotation_head.weight"] = torch.zeros(4, 8)
    state["rotation_head.bias"] = torch.zeros(4)
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"model": {"backbone": "unet_tiny", "kwargs": {}}, "lr": 1e-5},
    }
    if meta is not None:
        checkpoint["sap_meta"] = meta
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    "prefix", ["net.", "net._orig_mod.", "module.net.", "_orig_mod.", "module."]
)
def test_lightning_checkpoint_and_wrapper_prefixes(prefix, tmp_path):
    source = trained_like(build("unet_tiny", 2, 10, 0))
    path = tmp_path / "last.ckpt"
    save_lightning_layout(path, source, meta_for("unet_tiny", 2, 10, "skeleton"), prefix)
    target = build("unet_tiny", 2, 2, 1)

    report = transfer_weights(target, path, spec="unet_tiny", expected_task="skeleton")

    assert report.prefix == prefix and report.source_kind == "lightning checkpoint"
    assert torch.equal(
        target.state_dict()["down_4.convs.conv_1.conv.weight"],
        source.state_dict()["down_4.convs.conv_1.conv.weight"],
    )
    assert {"rotation_head.weight", "rotation_head.bias"} <= set(report.unused_source_keys)


def test_module_source_and_prefix_preference():
    inner = trained_like(build("unet_tiny", 1, 2, 0))
    report = transfer_weights(build("unet_tiny", 1, 2, 1), LitLike(inner), mode="full")
    assert report.prefix == "net." and report.source_kind == "module"

    # Two full copies (e.g. an EMA beside the network): the library's ``net.`` wins.
    ema = trained_like(build("unet_tiny", 1, 2, 2))
    both = {
        **{f"ema_net.{k}": v for k, v in ema.state_dict().items()},
        **{f"net.{k}": v for k, v in inner.state_dict().items()},
    }
    target = build("unet_tiny", 1, 2, 3)
    transfer_weights(target, both, mode="full")
    assert torch.equal(
        target.state_dict()["final_conv.weight"], inner.state_dict()["final_conv.weight"]
    )
    # Without a preferred prefix the choice would be a guess: refuse.
    ambiguous = {
        k.replace("net.", "student.", 1) if k.startswith("net.") else k: v for k, v in both.items()
    }
    with pytest.raises(CheckpointError, match="ambiguous"):
        transfer_weights(target, ambiguous, mode="full")


def test_refuses_files_that_need_arbitrary_objects(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    state = build("unet_tiny", 1, 2, 0).state_dict()
    torch.save({"state_dict": state, "hyper_parameters": NotAllowedInCheckpoints()}, path)
    with pytest.raises(CheckpointError) as err:
        transfer_weights(build("unet_tiny", 1, 2, 1), path, spec="unet_tiny")
    message = str(err.value)
    assert str(path) in message and "NotAllowedInCheckpoints" in message
    assert "arbitrary" in message and "weights_only" in message


def test_truncated_and_missing_files_are_named(tmp_path):
    good = tmp_path / "good.pt"
    export_backbone(build("unet_tiny", 1, 2, 0), good, meta_for("unet_tiny", 1, 2, "skeleton"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"truncated\.pt: cannot read the file, it is truncated"
    ):
        load_checkpoint_file(truncated)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint_file(tmp_path / "absent.pt")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint_file(tmp_path / "list.pt")


def test_wrong_task_is_refused(tmp_path):
    path = export_backbone(
        build("unet_tiny", 1, 10, 0), tmp_path / "s.pt", meta_for("unet_tiny", 1, 10, "skeleton")
    )
    target = build("unet_tiny", 1, 2, 1)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="is a 'skeleton' checkpoint, but a 'ssl' one"):
        transfer_weights(target, path, mode="encoder", expected_task="ssl")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(CheckpointError, match="no task metadata"):
        transfer_weights(target, build("unet_tiny", 1, 2, 0), spec="unet_tiny", expected_task="ssl")
    with pytest.raises(ConfigError, match="expected_task"):
        transfer_weights(target, path, expected_task="segmentation")


def test_backbone_named_in_metadata_must_match(tmp_path):
    path = export_backbone(
        build("unet_tiny", 1, 2, 0), tmp_path / "u.pt", meta_for("unet_tiny", 1, 2, "lesion")
    )
    with pytest.raises(
        CheckpointError, match="holds a 'unet_tiny' backbone, the model is segresnet"
    ):
        transfer_weights(build("segresnet", 1, 2, 1), path, spec="segresnet")
    # Without a spec, the metadata names the backbone.
    report = transfer_weights(build("unet_tiny", 1, 2, 1), path)
    assert report.skipped == ["final_conv.weight", "final_conv.bias"]
    with pytest.raises(ConfigError, match="needs the backbone spec"):
        transfer_weights(build("unet_tiny", 1, 2, 1), build("unet_tiny", 1, 2, 0))


def test_dynunet_tensors_listed_under_two_names():
    spec = get_spec("dynunet")
    source_net = trained_like(build("dynunet", 1, 10, 0))
    full_state = source_net.state_dict()
    assert "input_block.conv1.conv.weight" in full_state
    assert "skip_layers.downsample.conv1.conv.weight" in full_state  # the same tensor

    for variant in ("both names", "canonical only", "alias only"):
        if variant == "both names":
            source = full_state
        elif variant == "canonical only":
            source = {k: v for k, v in full_state.items() if not k.startswith("skip_layers.")}
        else:
            source = {
                k: v
                for k, v in full_state.items()
                if k.startswith(("skip_layers.", "output_block."))
            }
        target = build("dynunet", 1, 2, 1)
        fresh = snapshot(target)
        report = transfer_weights(target, source, spec="dynunet")
        for key, value in target.state_dict().items():  # both names of every tensor
            if spec.is_head_key(key):
                assert torch.equal(value, fresh[key]), (variant, key)
            else:
                assert torch.equal(value, full_state[key]), (variant, key)
        assert not any(k.startswith("skip_layers.") for k in report.loaded), variant
        assert report.skipped == list(spec.head_keys)


def test_dynunet_encoder_mode_and_deep_supervision():
    spec = get_spec("dynunet")
    source = trained_like(build("dynunet", 1, 3, 0, deep_supervision=True))
    target = build("dynunet", 1, 3, 1, deep_supervision=True)
    before = snapshot(target)
    report = transfer_weights(target, source, mode="encoder", spec="dynunet")
    after = target.state_dict()
    assert torch.equal(
        after["skip_layers.next_layer.next_layer.conv1.conv.weight"],
        source.state_dict()["bottleneck.conv1.conv.weight"],
    )
    assert torch.equal(
        after["upsamples.0.transp_conv.conv.weight"], before["upsamples.0.transp_conv.conv.weight"]
    )
    assert all(spec.is_encoder_key(k) for k in report.loaded)

    report = transfer_weights(target, source, mode="all_but_head", spec="dynunet")
    assert any(k.startswith("deep_supervision_heads.") for k in report.skipped)
    assert torch.equal(
        after["deep_supervision_heads.0.conv.conv.weight"],
        before["deep_supervision_heads.0.conv.conv.weight"],
    )


@pytest.mark.parametrize("name", list_backbones())
def test_param_groups_cover_every_parameter_once(name):
    spec = get_spec(name)
    model = build(name, 2, 3, 0)
    groups = param_groups(model, name, encoder_lr=2e-6, decoder_lr=1e-5, weight_decay=1e-5)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}
    encoder_ids = {id(p) for p in groups[0]["params"]}
    for key, param in model.named_parameters():
        assert (id(param) in encoder_ids) == spec.is_encoder_key(key), key
    assert [g["lr"] for g in groups] == [2e-6, 1e-5]
    optimizer = torch.optim.Adam(groups)
    assert [g["name"] for g in optimizer.param_groups] == ["encoder", "decoder"]


def test_param_groups_refuses_a_foreign_spec():
    with pytest.raises(ConfigError, match="encoder prefixes"):
        param_groups(build("unet_tiny", 1, 2, 0), "swin_unetr", 1e-5, 1e-5)


def test_export_is_plain_and_loadable_with_weights_only(tmp_path):
    net = build("unet_tiny", 2, 2, 0)
    meta = meta_for("unet_tiny", 2, 2, "lesion")
    path = export_backbone(net, tmp_path / "sub" / "lesion.pt", meta)
    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == FORMAT and loaded["format_version"] == FORMAT_VERSION == 2
    assert loaded["meta"]["spacing"] == [1.5, 1.5, 5.0]
    assert type(loaded["meta"]["spacing"][0]) is float
    assert type(loaded["meta"]["versions"]["torch"]) is str
    assert loaded["meta"]["label_names"] == ["background", "lesion"]
    assert loaded["meta"]["backbone_kwargs"]["features"] == [8, 16, 32, 64, 64, 16]
    assert json.loads(json.dumps(loaded["meta"])) == loaded["meta"]
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in net.state_dict().items())
    assert [p.name for p in path.parent.iterdir()] == ["lesion.pt"]  # no temporary left

    # Invalid metadata fails before anything is written: the previous export survives.
    bad = {**meta, "task": "segmentation"}
    with pytest.raises(ConfigError, match="task"):
        export_backbone(build("unet_tiny", 2, 2, 1), path, bad)
    with pytest.raises(ConfigError, match=r"meta\['spacing'\]\[0\] is a object"):
        export_backbone(net, path, {**meta, "spacing": [object()]})
    assert torch.equal(
        torch.load(path, weights_only=True)["state_dict"]["final_conv.weight"],
        net.state_dict()["final_conv.weight"],
    )


@pytest.mark.parametrize("version", [1, 3, None])
def test_other_format_versions_are_refused_naming_the_version(tmp_path, version):
    """Version 1 (before the metadata named the arm and recipe) and unknown ones are refused in
    one line naming the file's version; nothing is loaded."""
    path = export_backbone(
        build("unet_tiny", 1, 2, 0), tmp_path / "a.pt", meta_for("unet_tiny", 1, 2, "lesion")
    )
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = version
    torch.save(payload, path)
    target = build("unet_tiny", 1, 2, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"format_version {version!r}; this sap_lightning"):
        transfer_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_report_round_trips_as_json(tmp_path):
    source = build("unet_tiny", 1, 10, 0)
    target = build("unet_tiny", 2, 2, 1)
    report = transfer_weights(target, source, spec="unet_tiny")
    path = report.save_json(tmp_path / "transfer.json")
    assert read_json(path) == report.to_dict()
    n_loaded = len(target.state_dict()) - 2 - 1  # all but the head (2) and the input conv (1)
    assert f"loaded {n_loaded}, adapted 1, skipped 2, missing 0" in report.summary()


def test_transfer_into_a_compiled_style_wrapper():
    """Targets wrapped by ``torch.compile`` are unwrapped through ``_orig_mod``."""

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    inner = build("unet_tiny", 1, 2, 1)
    source = trained_like(build("unet_tiny", 1, 2, 0))
    transfer_weights(Wrapper(inner), source, mode="full")
    assert torch.equal(
        inner.state_dict()["final_conv.bias"], source.state_dict()["final_conv.bias"]
    )


def test_copies_are_independent_of_the_source():
    source = build("unet_tiny", 1, 2, 0)
    target = build("unet_tiny", 1, 2, 1)
    transfer_weights(target, source, mode="full")
    reference = copy.deepcopy(target.state_dict())
    with torch.no_grad():
        source.final_conv.bias.add_(1.0)
    assert torch.equal(target.state_dict()["final_conv.bias"], reference["final_conv.bias"])


def test_exported_dynunet_keeps_aliases_shared_and_is_summarised(tmp_path):
    net = build("dynunet", 1, 3, 0)
    path = export_backbone(net, tmp_path / "d.pt", meta_for("dynunet", 1, 3, "skeleton"))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert (
        state["input_block.conv1.conv.weight"].data_ptr()
        == state["skip_layers.downsample.conv1.conv.weight"].data_ptr()
    )
    summary = summarize_checkpoint(path)
    distinct = {id(t): t for t in net.state_dict(keep_vars=True).values()}
    assert summary["kind"] == "exported backbone"
    assert summary["tensors"] == len(net.state_dict())
    assert summary["distinct_tensors"] == len(distinct) < summary["tensors"]
    assert summary["parameters"] == sum(
        t.numel() for t in distinct.values() if t.is_floating_point()
    )
    assert summary["head_shapes"] == {
        "output_block.conv.conv.weight": [3, 4, 1, 1, 1],
        "output_block.conv.conv.bias": [3],
    }

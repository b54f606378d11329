"""Model factory: norm/act registries, per-backbone census, functional-activation detection,
no-norm init, weights loading and losses. CPU only, 32 px inputs, batch 2."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agelab import models
from agelab.errors import ModelError
from agelab.losses import LOSSES, DexLoss, make_loss
from agelab.models import (
    ACTS,
    NORMS,
    SUPPORTED_BACKBONES,
    backbones,
    build_model,
    functional_activation_calls,
    resolve_backbone,
)
from agelab.models.acts import TRUNK_ACT_CLASSES, get_act
from agelab.models.norms import (
    InstanceNormSkipped,
    LastDimNorm,
    get_norm,
    group_count,
    norm_kind,
)
from agelab.models.weights import SkipInit

IMG = 32
NORM_LIST = list(NORMS)
ACT_LIST = list(ACTS)


# Tiny models run fastest on one thread on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(batch: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _class_names(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


# ---------------------------------------------------------------------------- registries


def test_registries_have_the_contract_names():
    assert NORM_LIST == ["batch", "group", "layer", "instance", "frozen_batch", "none"]
    assert ACT_LIST == ["relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "mish"]
    assert list(LOSSES) == ["l1", "l2", "huber", "dex"]


def test_resolve_backbone_alias_and_close_matches():
    assert resolve_backbone("vit_tiny_patch16") == "vit_tiny_patch16_224"
    assert resolve_backbone("resnet18") == "resnet18"
    with pytest.raises(ValueError, match="resnet18") as exc:
        resolve_backbone("resnet19")
    assert "unknown backbone 'resnet19'" in str(exc.value)


def test_config_validators_use_the_registries():
    from agelab.config import ModelConfig, TrainConfig

    assert ModelConfig(backbone="vit_tiny_patch16", norm="none", act="mish").norm == "none"
    assert TrainConfig(loss="dex").loss == "dex"
    for bad in ({"norm": "batchnorm"}, {"act": "swish"}, {"backbone": "resnet19"}):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_registry_entries_hold_their_facts_and_unknown_names_list_the_valid_ones():
    with pytest.raises(ModelError, match="unknown norm 'batchnorm'; valid choices: batch, group"):
        get_norm("batchnorm")
    with pytest.raises(ModelError, match="unknown act 'swish'; valid choices: relu, leaky_relu"):
        get_act("swish")
    for name, norm in NORMS.items():
        assert norm_kind(norm(16, 8)) == name  # an entry recognises what it builds
    assert [name for name, norm in NORMS.items() if norm.adaptive] == [
        "batch",
        "group",
        "layer",
        "instance",
    ]
    for act in ACTS.values():
        assert type(act()) is act.layer and act.gain > 0
    assert ACTS["tanh"].gain == 5.0 / 3.0 and ACTS["relu"].gain == math.sqrt(2.0)


def test_group_count_is_largest_divisor():
    assert group_count(64, 8) == 8
    assert group_count(36, 8) == 6
    assert group_count(7, 8) == 7
    assert group_count(13, 8) == 1


# ------------------------------------------------------------------ every norm × act × net


def _latin_square() -> list[tuple[str, str, str]]:
    """Seven builds per backbone covering all 7 acts and all 6 norms: (group, tanh) on every
    backbone, then the other six acts paired with the six norms, the pairing shifted per
    backbone (the full 294-cell product with forward/backward would take minutes on CPU; the
    full norm × act product is built for resnet10t below)."""
    others = [a for a in ACT_LIST if a != "tanh"]
    cells = []
    for b, backbone in enumerate(SUPPORTED_BACKBONES):
        cells.append((backbone, "group", "tanh"))
        for i, act in enumerate(others):
            cells.append((backbone, NORM_LIST[(i + b) % len(NORM_LIST)], act))
    return cells


@functools.cache
def _group_tanh(backbone: str):
    """One shared (group, tanh) build per backbone for the tests that only inspect it."""
    return build_model(backbone, "group", "tanh", img_size=IMG, seed=0)


def _assert_census_exact(model, census, norm: str, act: str) -> None:
    assert census["requested"]["norm"] == norm and census["requested"]["act"] == act
    assert set(census["norm_kinds"]) == {norm}, census["norm_kinds"]
    assert set(census["act_kinds"]) == {act}, census["act_kinds"]
    assert census["functional_activations"] == {}
    # The census is computed from the modules: cross-check it against a fresh walk.
    n_norms = sum(norm_kind(m) is not None for m in model.backbone.modules())
    assert sum(census["norm_kinds"].values()) == n_norms > 0
    n_acts = sum(isinstance(m, TRUNK_ACT_CLASSES) for m in model.backbone.modules())
    assert sum(census["act_kinds"].values()) == n_acts > 0
    # Anything left out by design is named in the census.
    skipped = [m for m in model.modules() if isinstance(m, InstanceNormSkipped)]
    assert len(skipped) == len(census["instance_norms_skipped"])
    if skipped:
        assert norm == "instance" and any("single position" in n for n in census["notes"])


@pytest.mark.parametrize(("backbone", "norm", "act"), _latin_square())
def test_every_norm_and_act_on_every_backbone(backbone, norm, act):
    if (norm, act) == ("group", "tanh"):
        model, census = _group_tanh(backbone)
    else:
        model, census = build_model(backbone, norm, act, img_size=IMG, seed=0)
    _assert_census_exact(model, census, norm, act)
    model.train()
    model.zero_grad()
    out = model(_x())
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_group_tanh_leaves_no_batchnorm_or_relu_family(backbone):
    model, census = _group_tanh(backbone)
    names = _class_names(model)
    forbidden = {
        "BatchNorm2d",
        "BatchNormAct2d",
        "ReLU",
        "ReLU6",
        "SiLU",
        "GELU",
        "Hardswish",
        "LayerNorm",
        "LayerNorm2d",
    }
    assert not names & forbidden, names & forbidden
    assert "GroupNorm" in names and "Tanh" in names
    assert set(census["norms"]) == {"GroupNorm"} and set(census["acts"]) == {"Tanh"}


@pytest.mark.parametrize("norm", NORM_LIST)
def test_full_norm_act_product(norm):
    """All 42 norm × act cells, on timm's tiny ``test_resnet`` (the ResNet build path of
    resnet10t/resnet18 at a fraction of the build time), forward included."""
    for act in ACT_LIST:
        model, census = build_model("test_resnet", norm, act, img_size=IMG, seed=0)
        _assert_census_exact(model, census, norm, act)
        assert torch.isfinite(model(_x())).all()


@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_swap_alone_reaches_everything(backbone, monkeypatch):
    """With no constructor keywords at all (as for an unknown timm family), the module swap
    by itself must produce the requested kinds."""
    monkeypatch.setattr(backbones, "FAMILIES", {})
    model, census = build_model(backbone, "group", "elu", img_size=IMG)
    assert census["built_with"] == []
    assert set(census["norm_kinds"]) == {"group"} and set(census["act_kinds"]) == {"elu"}
    assert census["swapped"]["norm"] > 0 and census["swapped"]["act"] > 0
    assert torch.isfinite(model(_x())).all()


def test_gates_are_kept_and_counted():
    _, census = build_model("mobilenetv3_small_100", "batch", "gelu", img_size=IMG)
    assert census["gates"] == {"Hardsigmoid": 9}
    assert any("gates" in n for n in census["notes"])
    _, census = build_model("efficientnet_b0", "batch", "gelu", img_size=IMG)
    assert set(census["gates"]) == {"Sigmoid"}


def test_vit_norm_applies_to_tokens():
    model, census = build_model("vit_tiny_patch16", "batch", "relu", img_size=IMG)
    wrapped = [m for m in model.modules() if isinstance(m, LastDimNorm)]
    assert len(wrapped) == census["norm_kinds"]["batch"] == 25  # 2 per block × 12 + final
    assert all(isinstance(m.norm, nn.BatchNorm2d) for m in wrapped)
    model, census = build_model("vit_tiny_patch16", "layer", "gelu", img_size=IMG)
    assert census["norms"] == {"LayerNorm": 25}  # plain token LayerNorm, no wrapper
    assert any("tokens" in n for n in census["notes"])


def test_instance_norm_on_single_position_is_identity_and_listed():
    # 32 px through ResNet: the last stage is 1×1, where instance statistics are undefined.
    _, census = build_model("resnet18", "instance", "relu", img_size=32)
    assert census["instance_norms_skipped"] and all(
        q.startswith("layer4") for q in census["instance_norms_skipped"]
    )
    _, census64 = build_model("resnet18", "instance", "relu", img_size=64)
    assert census64["instance_norms_skipped"] == []


# ----------------------------------------------------------------- functional activations


@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_functional_activation_detection(backbone):
    model, census = _group_tanh(backbone)
    assert census["functional_activations"] == {}
    x = _x(1)
    assert functional_activation_calls(model, x) == {}

    # Positive control on the same network: a functional call hidden in forward is caught
    # (and attributed), whether a torch.nn.functional call or a tensor method.
    original = model.backbone.forward
    model.backbone.forward = lambda inp: F.gelu(original(inp)).sigmoid()
    try:
        calls = functional_activation_calls(model, x)
    finally:
        del model.backbone.forward
    assert calls["gelu"]["calls"] == 1 and calls["sigmoid"]["calls"] == 1
    assert "backbone" in calls["gelu"]["where"][0]


def test_functional_activation_contradicting_request_is_rejected(monkeypatch):
    from timm.models.resnet import BasicBlock

    forward = BasicBlock.forward
    monkeypatch.setattr(BasicBlock, "forward", lambda self, x: F.relu(forward(self, x)))
    with pytest.raises(ModelError, match="functionally") as exc:
        build_model("resnet10t", "batch", "tanh", img_size=IMG)
    assert "relu" in str(exc.value) and "BasicBlock" in str(exc.value)
    # The same functional ReLU agrees with act=relu: accepted, and said so in the census.
    _, census = build_model("resnet10t", "batch", "relu", img_size=IMG)
    assert census["functional_activations"]["relu"]["calls"] == 4
    assert any("match the requested act" in n for n in census["notes"])


def test_real_timm_model_with_functional_relu_is_rejected():
    # MobileViT-v2's linear attention calls F.relu in forward.
    with pytest.raises(ModelError, match="LinearSelfAttention"):
        build_model("mobilevitv2_050", "batch", "tanh", img_size=64)


# --------------------------------------------------------------------------------- init


def test_no_norm_init_uses_skipinit_on_residual_branches():
    model, census = build_model("resnet18", "none", "relu", img_size=IMG, seed=0)
    gains = [m for m in model.modules() if isinstance(m, SkipInit)]
    assert census["init"]["scheme"] == "no-norm"
    assert census["init"]["skipinit_gains"] == len(gains) == 8
    assert all(g.gain.item() == 0.0 for g in gains)
    # Every block starts as its shortcut, so activations keep a sane scale without norms.
    feats = model.backbone(_x(4))
    assert torch.isfinite(feats).all() and 0.01 < feats.std() < 100


def test_adaptive_norms_zero_init_last_for_resnet_and_regnet():
    for backbone, n_blocks in (("resnet10t", 4), ("regnetx_002", 13)):
        for norm in ("batch", "group", "layer"):
            _, census = build_model(backbone, norm, "relu", img_size=IMG)
            assert census["init"] == {"scheme": "zero_init_last", "zeroed_norms": n_blocks}


def test_frozen_batch_from_scratch_gets_no_norm_init():
    _, census = build_model("regnetx_002", "frozen_batch", "relu", img_size=IMG)
    assert census["init"]["scheme"] == "no-norm" and census["init"]["skipinit_gains"] > 0
    _, census = build_model("vit_tiny_patch16", "none", "gelu", img_size=IMG)
    assert census["init"]["layer_scale"] == 24


def test_seed_makes_builds_identical_without_touching_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = build_model("resnet10t", "batch", "relu", img_size=IMG, seed=7)
    b, _ = build_model("resnet10t", "batch", "relu", img_size=IMG, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------------------ weights


def test_pretrained_without_weights_is_an_error():
    with pytest.raises(ModelError, match="local weights file"):
        build_model("resnet18", "batch", "relu", img_size=IMG, pretrained=True)
    with pytest.raises(ModelError, match="pretrained=false"):
        build_model("resnet18", "batch", "relu", img_size=IMG, weights="w.pth")
    with pytest.raises(ModelError, match="does not exist"):
        build_model(
            "resnet18", "batch", "relu", img_size=IMG, pretrained=True, weights="/nonexistent/w.pth"
        )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_loads_local_file(tmp_path, suffix):
    source, _ = build_model("resnet10t", "batch", "relu", img_size=IMG, seed=1)
    with torch.no_grad():  # non-trivial BN statistics, as trained weights would have
        source.backbone.bn1.running_var.uniform_(0.5, 2.0)
    state = dict(source.backbone.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet classifier is dropped on load
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, census = build_model(
        "resnet10t", "batch", "relu", img_size=IMG, pretrained=True, weights=path, seed=2
    )
    assert census["init"]["scheme"] == "pretrained"
    assert census["init"]["dropped_classifier_keys"] == 1
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    with pytest.raises(ModelError, match=str(path.name)):  # group-norm net: BN stats don't fit
        build_model("resnet10t", "group", "relu", img_size=IMG, pretrained=True, weights=path)
    # The usual fine-tuning set-up: BN statistics frozen. No SkipInit gains are added on top of
    # pretrained weights, and a checkpoint rebuild reproduces that structure.
    frozen, census = build_model(
        "resnet10t", "frozen_batch", "relu", img_size=IMG, pretrained=True, weights=path
    )
    assert census["norm_kinds"] == {"frozen_batch": 14}
    assert not any(isinstance(m, SkipInit) for m in frozen.modules())
    src_bn = source.backbone.bn1
    assert torch.equal(frozen.backbone.bn1.running_var, src_bn.running_var)
    rebuilt, _ = models.rebuild_model(frozen.spec)
    assert rebuilt.state_dict().keys() == frozen.state_dict().keys()


# -------------------------------------------------------------------------------- losses


def test_regression_losses_work_on_standardised_age():
    mean, std = torch.tensor(40.0), torch.tensor(10.0)
    ages = torch.tensor([30.0, 50.0])
    out = torch.tensor([[-1.0], [1.0]])  # exactly the standardised targets
    for name in ("l1", "l2", "huber"):
        loss = make_loss(name)
        assert loss.head_dim == 1
        assert float(loss(out, ages, mean, std)) == 0.0
        assert torch.allclose(loss.to_age(out, mean, std), ages)
    assert math.isclose(float(make_loss("l2")(out + 1, ages, mean, std)), 1.0)
    assert math.isclose(
        float(make_loss("huber", huber_delta=0.5)(out + 2, ages, mean, std)), 0.5 * (2 - 0.25)
    )


def test_dex_soft_two_bin_label_and_expectation():
    loss = DexLoss(max_age=10)
    assert loss.head_dim == 11
    ages = torch.tensor([3.25, 10.0, -2.0])
    # The minimiser of the cross-entropy is the label itself, whose expectation is the age.
    target = torch.zeros(3, 11)
    target[0, 3], target[0, 4] = 0.75, 0.25
    target[1, 10] = 1.0
    target[2, 0] = 1.0
    logits = torch.log(target.clamp_min(1e-12))
    assert torch.allclose(loss.to_age(logits, 0, 1), torch.tensor([3.25, 10.0, 0.0]), atol=1e-4)
    assert float(loss(logits, ages, 0, 1)) < float(loss(torch.zeros(3, 11), ages, 0, 1))
    with pytest.raises(ValueError, match="needs 11 outputs"):
        loss(torch.zeros(3, 5), ages, 0, 1)
    with pytest.raises(ValueError, match="valid choices"):
        make_loss("smooth_l1")


def test_build_from_config_sizes_the_head_for_the_loss():
    from agelab.config import ModelConfig

    model, census = models.build_model_from_config(
        ModelConfig(backbone="resnet10t"), IMG, "dex", max_age=90
    )
    assert model.out_dim == 91 and census["loss"]["name"] == "dex"
    ages = model.to_age(model(_x()))
    assert ages.shape == (2,) and ((ages >= 0) & (ages <= 90)).all()

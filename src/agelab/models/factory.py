"""Build an :class:`AgeRegressor` by name: ``build_model`` (checked arguments),
``rebuild_model`` (a checkpoint's recorded spec) and ``build_model_from_config``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agelab.errors import ModelError
from agelab.losses import make_loss
from agelab.models.acts import ACTS, get_act
from agelab.models.backbones import (
    Family,
    constructor_kwargs,
    create_backbone,
    family_of,
    family_spec,
    resolve_backbone,
)
from agelab.models.census import make_census
from agelab.models.norms import NORMS, get_norm
from agelab.models.probe import check_functional_activations, probe, skip_single_position_norms
from agelab.models.regressor import AgeRegressor
from agelab.models.swap import swap_acts, swap_norms
from agelab.models.weights import starting_weights

__all__ = ["build_model", "build_model_from_config", "rebuild_model"]

_SPEC_KEYS = ("backbone", "norm", "act", "img_size", "out_dim", "groups", "drop_rate")


def build_model(
    backbone: str,
    norm: str,
    act: str,
    *,
    img_size: int,
    out_dim: int = 1,
    groups: int = 8,
    pretrained: bool = False,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    seed: int | None = None,
) -> tuple[AgeRegressor, dict[str, Any]]:
    """Build ``backbone`` (any timm name) with ``norm``/``act`` from the registries.

    Returns ``(model, census)``. ``seed`` makes the initialisation reproducible without touching
    the global RNG (``None``: draw from it). ``pretrained=True`` needs a local ``weights`` file
    (``.safetensors`` or a torch state dict); nothing is ever downloaded.
    Raises :class:`ModelError` (a ``ValueError``) for requests that cannot be honoured.
    """
    try:
        name = resolve_backbone(backbone)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    get_norm(norm)
    get_act(act)
    if groups < 1:
        raise ModelError(f"groups must be ≥ 1 (got {groups})")
    if pretrained and weights is None:
        raise ModelError(
            f"pretrained=true for {name} needs a local weights file (model.weights=/path/to/"
            f"{name}.safetensors or .pth): agelab never downloads weights"
        )
    if weights is not None and not pretrained:
        raise ModelError(
            f"a weights file ({weights}) is set but pretrained=false; set "
            "model.pretrained=true to load it, or drop model.weights"
        )
    spec = _spec(name, norm, act, img_size, out_dim, groups, drop_rate, pretrained)
    return _build(spec, seed=seed, weights=Path(weights) if weights is not None else None)


def rebuild_model(spec: dict[str, Any], *, seed: int | None = 0) -> tuple[AgeRegressor, dict]:
    """The architecture recorded in ``AgeRegressor.spec`` (e.g. a checkpoint's), freshly
    initialised: a spec built from pretrained weights is rebuilt with the same structure (no
    no-norm init modules) but without reading the weights file again."""
    for key in _SPEC_KEYS:
        if key not in spec:
            raise ModelError(f"model spec lacks {key!r}: {spec}")
    if spec["norm"] not in NORMS or spec["act"] not in ACTS:
        raise ModelError(f"model spec names an unknown norm/act: {spec}")
    return _build(
        _spec(
            resolve_backbone(spec["backbone"]), spec["norm"], spec["act"], spec["img_size"],
            spec["out_dim"], spec["groups"], spec["drop_rate"], spec.get("pretrained", False),
        ),
        seed=seed,
        weights=None,
    )  # fmt: skip


def build_model_from_config(
    cfg: Any,
    img_size: int,
    loss: str = "l1",
    *,
    huber_delta: float = 1.0,
    max_age: float = 120.0,
    seed: int | None = None,
) -> tuple[AgeRegressor, dict[str, Any]]:
    """:func:`build_model` from a model config (any object with ``backbone``, ``norm``, ``act``,
    ``groups``, ``pretrained``, ``weights`` and ``drop_rate``, such as
    :class:`agelab.config.ModelConfig`), with the head sized for ``loss`` (``dex``:
    ``max_age + 1`` bins) and the loss attached for :meth:`AgeRegressor.to_age`."""
    loss_fn = make_loss(loss, huber_delta=huber_delta, max_age=max_age)
    model, census = build_model(
        cfg.backbone,
        cfg.norm,
        cfg.act,
        img_size=img_size,
        out_dim=loss_fn.head_dim,
        groups=cfg.groups,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        drop_rate=cfg.drop_rate,
        seed=seed,
    )
    model.loss = loss_fn
    census["loss"] = loss_fn.spec()
    return model, census


def _spec(
    name: str,
    norm: str,
    act: str,
    img_size: Any,
    out_dim: Any,
    groups: Any,
    drop_rate: Any,
    pretrained: Any,
) -> dict[str, Any]:
    """The plain build arguments an :class:`AgeRegressor` keeps (enough to rebuild it)."""
    return {
        "backbone": name,
        "norm": norm,
        "act": act,
        "img_size": int(img_size),
        "out_dim": int(out_dim),
        "groups": int(groups),
        "drop_rate": float(drop_rate),
        "pretrained": bool(pretrained),
    }


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(
    spec: dict[str, Any], *, seed: int | None, weights: Path | None
) -> tuple[AgeRegressor, dict[str, Any]]:
    """timm network → swap → probe → starting weights → head, then the census."""
    name, norm, act, img_size = spec["backbone"], spec["norm"], spec["act"], spec["img_size"]
    family = family_of(name)
    kwargs, notes = constructor_kwargs(
        family, norm, act, spec["groups"], img_size, not spec["pretrained"]
    )
    with _seeded(seed):
        net, kwargs = create_backbone(name, family, kwargs, img_size, notes)
        swapped = {"norm": swap_norms(net, norm, spec["groups"]), "act": swap_acts(net, act)}
        functional, positions, num_features = probe(net, img_size)
        skipped = skip_single_position_norms(net, positions, notes)
        calls = check_functional_activations(functional, name, act, notes)
        init = starting_weights(
            net, name, family_spec(family) or Family(), norm, act,
            pretrained=spec["pretrained"], weights=weights, notes=notes,
        )  # fmt: skip
        model = AgeRegressor(net, num_features, spec["out_dim"], spec["drop_rate"], spec)
    census = make_census(
        model, family=family, kwargs=kwargs, functional=calls, swapped=swapped,
        skipped=skipped, init=init, notes=notes,
    )  # fmt: skip
    return model, census

"""Model factory: a timm backbone built from scratch with a chosen normalisation and activation.

``build_model(backbone, norm, act, img_size=...)`` returns an :class:`AgeRegressor` (backbone →
pooled features → dropout → linear head) and a *census*, a plain dict that proves what was
built (:mod:`.census`).

How a choice reaches the network (details and the per-backbone table in ``docs/models.md``):

1. timm's own ``norm_layer=`` / ``act_layer=`` keywords, for the architecture families whose
   constructors take them, in the calling convention each family uses (:mod:`.backbones`);
2. a module swap afterwards for everything the keywords did not reach (:mod:`.swap`);
3. a probe forward pass that rejects a backbone whose *functional* activations contradict the
   request and finds instance norms that see a single spatial position (:mod:`.probe`);
4. the starting weights: agelab's residual initialisation, or a local pretrained file
   (:mod:`.weights`).

The choices themselves are registries by name, one entry per option with all its facts:
:data:`NORMS` (:mod:`.norms`) and :data:`ACTS` (:mod:`.acts`). :mod:`.factory` ties the steps
together. Nothing here imports :mod:`agelab.config`: the factory takes plain arguments.
"""

from agelab.models.acts import ACTS
from agelab.models.backbones import SUPPORTED_BACKBONES, resolve_backbone
from agelab.models.factory import build_model, build_model_from_config, rebuild_model
from agelab.models.norms import NORMS
from agelab.models.probe import functional_activation_calls
from agelab.models.regressor import AgeRegressor

__all__ = [
    "ACTS",
    "NORMS",
    "SUPPORTED_BACKBONES",
    "AgeRegressor",
    "build_model",
    "build_model_from_config",
    "functional_activation_calls",
    "rebuild_model",
    "resolve_backbone",
]

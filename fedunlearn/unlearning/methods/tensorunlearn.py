"""TensorUnlearn (the poster): the influence step with the KFAC inverse, MPO-compressed for wide
factors.

``kfac`` solves each factor as ``factor-solver`` says (dense by default); ``kfac-mpo`` forces the
MPO (TT-SVD + ALS) path for factors wider than ``mpo-threshold``, as the poster does.
"""

from __future__ import annotations

import torch.nn as nn

from fedunlearn.curvature import Batches
from fedunlearn.unlearning.api import ClientContext, ClientUpdate
from fedunlearn.unlearning.client_side import ClientSideMethod
from fedunlearn.unlearning.influence import influence_step
from fedunlearn.unlearning.registry import register


class TensorUnlearn(ClientSideMethod):
    """The influence step with the KFAC inverse (``solver``)."""

    solver = "kfac"

    def solve(self, model: nn.Module, forget_batches: Batches, context: ClientContext) -> ClientUpdate:
        update, _ = influence_step(model, forget_batches, context.influence_weight, self.config, solver=self.solver)
        return update


@register("kfac")
class KFACUnlearn(TensorUnlearn):
    summary = "TensorUnlearn: KFAC inverse on the affected client (factor-solver per factor)"
    solver = "kfac"


@register("kfac-mpo")
class KFACMPOUnlearn(TensorUnlearn):
    summary = "TensorUnlearn with MPO (TT-SVD + ALS) inverses for factors wider than mpo-threshold"
    solver = "kfac-mpo"

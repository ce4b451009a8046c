"""TensorUnlearn (the poster): the influence step with the KFAC inverse, MPO-compressed for wide
factors, plus Gaussian noise and the (ε, δ) certificate of its eq. (3).

``kfac`` solves each factor as ``factor-solver`` says (dense by default); ``kfac-mpo`` forces the
MPO (TT-SVD + ALS) path for factors wider than ``mpo-threshold``, as the poster does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fedunlearn.curvature import Batches, certificate, kronecker_inverse_gap, resolve_param_names
from fedunlearn.training import derive_seed
from fedunlearn.config import ConfigKey, non_negative_float, open_unit_interval
from fedunlearn.unlearning.api import ClientContext, ClientUpdate
from fedunlearn.unlearning.client_side import ClientSideMethod
from fedunlearn.unlearning.influence import influence_step, norm_of
from fedunlearn.unlearning.registry import register
from fedunlearn.unlearning.objective import (
    per_example_cross_entropy_gradients,
    regularizer_curvature,
    regularizer_gradient,
)

PER_SAMPLE_CHUNK = 64


def max_per_sample_gradient_norm(model: nn.Module, batches: Batches) -> float:
    """G_max = max over forget examples of ‖∇ℓ(z, θ*)‖₂ (the certificate's Newton-residual term)."""
    names = resolve_param_names(model)
    per_example_gradient = per_example_cross_entropy_gradients(model, names)
    regularizer_terms = regularizer_gradient(model, names)
    regularizer_by_name = None if regularizer_terms is None else dict(zip(names, regularizer_terms))
    largest = 0.0
    was_training = model.training
    model.eval()
    for inputs, targets in batches:
        for start in range(0, len(targets), PER_SAMPLE_CHUNK):
            gradients = per_example_gradient(inputs[start : start + PER_SAMPLE_CHUNK], targets[start : start + PER_SAMPLE_CHUNK])
            squared = 0.0
            for name, g in gradients.items():
                if regularizer_by_name is not None:
                    g = g + regularizer_by_name[name]
                squared = squared + g.flatten(1).pow(2).sum(dim=1)
            largest = max(largest, float(squared.sqrt().max()))
    model.train(was_training)
    return largest


def kfac_inverse_gap(diagnostics: dict[str, Any], damping: float) -> float | None:
    """γ = max over layers of ‖(Ã⊗G̃)⁻¹ − (Â⊗Ĝ)⁻¹‖₂ from the per-factor Proposition 2 bounds.

    Dense factors (and MPO factors that fell back to dense) contribute 0; an MPO factor whose
    Proposition 2 condition held contributes its bound; a factor with no bound (Nyström) makes γ
    unknown, and then no ε is certified. ‖Â⁻¹‖₂ ≤ 1/λ because Â ⪰ λI.
    """
    gamma = 0.0
    for layer in diagnostics.get("layers", {}).values():
        gaps = []
        for factor in (layer["A"], layer["G"]):
            used = factor.get("fallback") or factor.get("solver") or factor.get("used")
            if used == "dense":
                gaps.append(0.0)
                continue
            bound = factor.get("prop2", {}).get("inverse_error_bound")
            if bound is None:
                return None
            gaps.append(float(bound))
        gamma = max(gamma, kronecker_inverse_gap(gaps[0], 1.0 / damping, gaps[1], 1.0 / damping))
    return gamma


class TensorUnlearn(ClientSideMethod):
    """The influence step with the KFAC inverse (``solver``), noise and the certificate."""

    solver = "kfac"
    config_keys = (
        ConfigKey("noise-sigma", 0.0, "Gaussian noise σ added to each kfac update (TensorUnlearn); > 0 gives a certified ε.", check=non_negative_float),
        ConfigKey("delta", 1e-5, "δ of the (ε, δ) certificate.", check=open_unit_interval),
    )

    def solve(self, model: nn.Module, forget_batches: Batches, context: ClientContext) -> ClientUpdate:
        config = self.config
        update, forget_gradient = influence_step(model, forget_batches, context.influence_weight, config, solver=self.solver)
        sigma = float(config["noise-sigma"])
        certificate_info: dict[str, Any] = {"noise_sigma": sigma, "delta": float(config["delta"])}
        if sigma > 0:
            generator = torch.Generator().manual_seed(derive_seed(context.seed, "noise", context.partition_id))
            # Drawn on the CPU so a seed gives the same noise on every device.
            update.delta = [d + sigma * torch.randn(d.shape, generator=generator, dtype=d.dtype).to(d.device) for d in update.delta]
            strong_convexity = float(config["damping"]) + regularizer_curvature(model)
            gamma = kfac_inverse_gap(update.diagnostics, strong_convexity)
            if gamma is None:
                certificate_info["epsilon_reason"] = "a factor solver without an inverse-error bound (nystrom) was used"
            else:
                sensitivity = certificate.sensitivity(
                    num_forget=update.num_forget_examples,
                    num_total=context.total_examples,
                    max_forget_grad_norm=max_per_sample_gradient_norm(model, forget_batches),
                    strong_convexity=strong_convexity,
                    gamma=gamma,
                    forget_gradient_norm=norm_of(forget_gradient),
                )
                update.epsilon = certificate.epsilon(sensitivity, sigma, float(config["delta"]))
                certificate_info.update(sensitivity=sensitivity, gamma=gamma, strong_convexity=strong_convexity)
        else:
            certificate_info["epsilon_reason"] = "noise-sigma = 0: no noise, no certificate"
        update.diagnostics["certificate"] = certificate_info
        return update


@register("kfac")
class KFACUnlearn(TensorUnlearn):
    summary = "TensorUnlearn: KFAC inverse on the affected client (factor-solver per factor), noise, (ε, δ)"
    solver = "kfac"


@register("kfac-mpo")
class KFACMPOUnlearn(TensorUnlearn):
    summary = "TensorUnlearn with MPO (TT-SVD + ALS) inverses for factors wider than mpo-threshold"
    solver = "kfac-mpo"

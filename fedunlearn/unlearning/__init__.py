"""Unlearning methods behind one registry: adding a method is one module and one line here."""

from __future__ import annotations

from fedunlearn.errors import ConfigError
from fedunlearn.unlearning.base import ClientSideMethod, ClientUpdate, RemainingClients, ServerSideMethod, ServerUpdate
from fedunlearn.unlearning.federaser import FedEraser
from fedunlearn.unlearning.fisher import FisherForgetting
from fedunlearn.unlearning.gradient_ascent import NaiveGradientAscent
from fedunlearn.unlearning.hf_kcu import HFKCU
from fedunlearn.unlearning.hf_kcu_global import HFKCUGlobal
from fedunlearn.unlearning.sisa import SISA
from fedunlearn.unlearning.tensorunlearn import TensorUnlearn

METHODS: dict[str, ClientSideMethod | ServerSideMethod] = {
    "hf-kcu": HFKCU(),
    "hf-kcu-global": HFKCUGlobal(),
    "kfac": TensorUnlearn("kfac", solver="kfac"),
    "kfac-mpo": TensorUnlearn("kfac-mpo", solver="kfac-mpo"),
    "naive-ga": NaiveGradientAscent(),
    "fisher": FisherForgetting(),
    "federaser": FedEraser(),
    "sisa": SISA(),
}


def get_method(name: str) -> ClientSideMethod | ServerSideMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("unlearn-methods", name, sorted(METHODS)) from None


def parse_methods(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        get_method(name)
    return names


__all__ = [
    "METHODS", "ClientSideMethod", "ClientUpdate", "RemainingClients", "ServerSideMethod", "ServerUpdate",
    "get_method", "parse_methods",
]

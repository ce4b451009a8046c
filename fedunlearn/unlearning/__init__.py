"""Unlearning methods behind one registry (:mod:`fedunlearn.unlearning.registry`).

A method is one module in :mod:`fedunlearn.unlearning.methods`; the seam it implements is in
:mod:`fedunlearn.unlearning.api`. Adding a method adds one file there, nothing else.
"""

from __future__ import annotations

from fedunlearn.unlearning.api import (
    ClientContext,
    ClientUpdate,
    Deletion,
    Every,
    FederationPort,
    Method,
    Outcome,
    RemainingClients,
    Requirements,
    ServerUpdate,
    TrainingHook,
)
from fedunlearn.unlearning.registry import (
    client_queries,
    create_method,
    method_class,
    method_classes,
    parse_methods,
    register,
)

__all__ = [
    "ClientContext", "ClientUpdate", "Deletion", "Every", "FederationPort", "Method", "Outcome", "RemainingClients",
    "Requirements", "ServerUpdate", "TrainingHook", "client_queries", "create_method", "method_class",
    "method_classes", "parse_methods", "register",
]

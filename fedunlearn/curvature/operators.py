"""The two operator protocols of the curvature core (curvlinops style: apply with ``@``).

- :class:`InverseOperator`: a parameter-space inverse (``CGInverse``, ``KFACInverse``).
  ``inverse @ vectors`` takes and returns lists of parameter-shaped tensors ordered as
  ``param_names``; ``diagnostics`` describes the operator and its last application.
- :class:`FactorInverse`: the inverse of one damped Kronecker factor A + lambda I
  (``DenseFactorInverse``, ``MPOFactorInverse``, ``NystromFactorInverse``).
  ``inverse @ rhs`` takes and returns a tensor of shape (d,) or (d, m); ``solve`` is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class InverseOperator(Protocol):
    param_names: list[str]
    diagnostics: dict

    def __matmul__(self, vectors: Sequence[Tensor]) -> list[Tensor]: ...


@runtime_checkable
class FactorInverse(Protocol):
    dim: int
    diagnostics: dict

    def solve(self, rhs: Tensor) -> Tensor: ...

    def __matmul__(self, rhs: Tensor) -> Tensor: ...

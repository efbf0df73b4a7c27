"""Gate runtime (placeholder until the ONNX gate lands): uniform and fixed gates."""

from __future__ import annotations

from collections.abc import Mapping


class UniformGate:
    kind = "uniform"
    experts: tuple[str, ...] = ()

    def values(self, text: str) -> dict[str, float]:
        return {}


class FixedGate:
    kind = "fixed"

    def __init__(self, values: Mapping[str, float]) -> None:
        self._values = dict(values)
        self.experts = tuple(self._values)

    def values(self, text: str) -> dict[str, float]:
        return dict(self._values)


class OnnxGate:
    kind = "onnx"

    @staticmethod
    def load(path: str) -> OnnxGate:
        raise ValueError("ONNX gates are not supported yet")

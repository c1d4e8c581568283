"""ModelCard: what a checkpoint is, as data (timm's PretrainedCfg, for certificates)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelCard"]


@dataclass
class ModelCard:
    """Everything a server or evaluator needs to use a checkpoint correctly.

    `lipschitz` is the structural constant of the architecture (1/min(std) for our
    orthogonal nets); `lipschitz_audited` is the guaranteed bound of the deployed
    weights and is the one certificates use once it is set.
    """

    name: str
    arch: str
    num_classes: int
    classes: list[str]
    palette: list[tuple[int, int, int]]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    input_size: tuple[int, int] = (64, 64)
    pad_multiple: int = 1
    lipschitz: float = 1.0
    lipschitz_audited: float | None = None
    default_eps: float = 0.1
    ignore_index: int = 255
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError("classes and palette need one entry per class")
        self.palette = [tuple(int(v) for v in c) for c in self.palette]
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.input_size = tuple(self.input_size)

    @property
    def certified_lipschitz(self) -> float:
        """The constant certificates must use: the audited one when known."""
        return self.lipschitz_audited if self.lipschitz_audited is not None else self.lipschitz

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))

"""Architectures, registry and ModelCard."""

from certseg.models import lipdeeplab as _lipdeeplab  # noqa: F401  (registers)
from certseg.models import lipunet as _lipunet  # noqa: F401  (registers)
from certseg.models import tiny as _tiny  # noqa: F401  (registers)
from certseg.models.card import ModelCard
from certseg.models.checkpoint import (
    build_from_card,
    is_lipschitz,
    load_checkpoint,
    require_lipschitz,
    save_checkpoint,
)
from certseg.models.registry import create_model, list_models, register_model

__all__ = [
    "ModelCard",
    "build_from_card",
    "create_model",
    "is_lipschitz",
    "list_models",
    "load_checkpoint",
    "register_model",
    "require_lipschitz",
    "save_checkpoint",
]

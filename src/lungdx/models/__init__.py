"""Models: a registry and one file per family. Importing this package registers them all."""

from lungdx.models import paper_cnn as _paper_cnn  # noqa: F401  (registers paper_cnn)
from lungdx.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]

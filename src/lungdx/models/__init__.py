"""Models: a registry and one file per family. Importing this package registers them all."""

from lungdx.models import backbones as _backbones  # noqa: F401  (registers the torchvision backbones, efficientnet_lite0)
from lungdx.models import nodule_ensemble as _nodule_ensemble  # noqa: F401  (registers nodule_ensemble)
from lungdx.models import nodule_net as _nodule_net  # noqa: F401  (registers nodule_net)
from lungdx.models import paper_cnn as _paper_cnn  # noqa: F401  (registers paper_cnn)
from lungdx.models.registry import create_model, list_models, register_model
from lungdx.models.weights import WeightsError, load_weights, split_parameters

__all__ = ["WeightsError", "create_model", "list_models", "load_weights", "register_model", "split_parameters"]

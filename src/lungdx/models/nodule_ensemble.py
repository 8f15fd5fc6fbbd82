"""Several nodule_nets trained on the same data, read as one model (a deep ensemble).

``NoduleEnsemble`` holds K ``NoduleNet`` members and runs the same stages as one of them
(``NoduleReader.analyse``), each stage averaged over the members:

- the lung field: the mean of the members' lung logits gives one mask, applied as a member applies it;
- the nodule map: the mean of the members' maps on that masked image (each with its own ``tta``);
  the peak and the candidates are read from the mean map;
- the candidates (when any member has a verifier): each candidate's score is the mean over members of
  the member's own candidate score (``NoduleNet.candidate_score``; a member without a verifier scores a
  candidate by the mean map's logit);
- the malignancy: the mean of the members' judges at the common peak.

Members are built from their own checkpoints' arguments, so they may differ in training recipe,
verifier or judge, but not in the geometry that ties the stages together (input size, task, crop,
mask dilation, region and where it is standardised). An ensemble is assembled from finished runs
(``lungdx ensemble``, ``lungdx.ensemble``), never trained as a whole.
"""

from __future__ import annotations

import torch
from torch import nn

from lungdx.models.nodule_net import NoduleNet, NoduleReader
from lungdx.models.registry import register_model

SHARED = ("crop_fraction", "crop_size", "dilate_px", "region", "standardise_in")
"""Member arguments that must agree: the stages of different members meet on one mask and one crop."""


class NoduleEnsemble(NoduleReader, nn.Module):
    """K nodule_nets averaged stage by stage; ``forward`` gives the ``task``'s logit, ``analyse`` the rest.

    Args:
        members: each member's ``NoduleNet`` arguments (without ``input_size`` and ``task``, which all share);
            ``None`` gives two default members, so that, like every registered model, it builds from
            ``input_size`` alone (an untrained shape; real ensembles come from ``lungdx ensemble``).
        input_size: the square input side.
        task: the task every member scores.
    """

    model_name = "nodule_ensemble"
    gradcam_layer = "members.0.detector.smooth"

    def __init__(self, members: list[dict] | None = None, input_size: int = 512, task: str = "malignant_vs_rest",
                 in_channels: int = 1):
        super().__init__()
        if members is None:
            members = [{}, {}]
        if not members:
            raise ValueError("nodule_ensemble needs at least one member")
        nets = []
        for index, kwargs in enumerate(members):
            kwargs = dict(kwargs)
            for key, value in (("input_size", input_size), ("task", task), ("in_channels", in_channels)):
                if (own := kwargs.pop(key, value)) != value:
                    raise ValueError(f"nodule_ensemble member {index}: {key} {own} differs from the ensemble's {value}")
            nets.append(NoduleNet(input_size=input_size, task=task, in_channels=in_channels, **kwargs))
        for key in SHARED:
            values = {getattr(net, key) for net in nets}
            if len(values) > 1:
                raise ValueError(f"nodule_ensemble members disagree on {key} ({sorted(values)}); they must share it")
        self.members = nn.ModuleList(nets)
        self.input_size, self.task, self.in_channels = input_size, task, in_channels
        first = nets[0]
        for key in SHARED:
            setattr(self, key, getattr(first, key))
        self.candidate_count = max((net.candidate_count for net in nets if net.verifies), default=first.candidate_count)

    @property
    def verifies(self) -> bool:
        """True when any member has a verifier."""
        return any(net.verifies for net in self.members)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """The mean of the members' lung-field logits."""
        return torch.stack([net.segment(images).float() for net in self.members]).mean(0)

    def mask_image(self, images: torch.Tensor, lung_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.members[0].mask_image(images, lung_logits)

    def map_region(self, lung_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.members[0].map_region(lung_logits, size)

    def detect(self, masked: torch.Tensor, lung_logits: torch.Tensor) -> torch.Tensor:
        """The mean of the members' nodule maps (``-30`` outside the lung region in every member's, so in the mean)."""
        return torch.stack([net.detect(masked, lung_logits) for net in self.members]).mean(0)

    def candidate_score(self, map_logits: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """(M,) the mean of the members' candidate scores (a member without a verifier: the mean map's logit)."""
        scores = [net.candidate_score(map_logits, crops) if net.verifies else map_logits for net in self.members]
        return torch.stack(scores).mean(0)

    def judge_at(self, masked: torch.Tensor, nodule_map: torch.Tensor, peak: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mean of the members' malignancy logits at the common peak."""
        return torch.stack([net.judge_at(masked, nodule_map, peak, dtype) for net in self.members]).mean(0)


def nodule_ensemble(members: list[dict] | None = None, **kwargs) -> NoduleEnsemble:
    """nodule_nets trained on the same data, averaged stage by stage (assembled by ``lungdx ensemble``)."""
    return NoduleEnsemble(members, **kwargs)


nodule_ensemble.assembled = True  # built from finished nodule_net runs (lungdx.ensemble), not trained
nodule_ensemble = register_model(nodule_ensemble)

"""The fraud model: a tabular MLP that carries its own input normalisation.

It is exported as TorchScript (no pickle anywhere), so Triton's Python backend, the registry's
evaluation gate and tests run it without this code. Its tensor contract with Triton:
input ``features`` (FP32, [batch, len(MODEL_INPUTS)]) -> output ``fraud_probability``
(FP32, [batch, 1]); the names are ``features.TRITON_INPUT``/``TRITON_OUTPUT``, so that
serving and the registry speak the contract without importing torch (2-3 s at start-up).
"""

from collections.abc import Sequence

import torch
from torch import nn


class FraudMLP(nn.Module):
    """Standardise -> (Linear, ReLU, Dropout)* -> Linear -> sigmoid."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        n_inputs = int(mean.shape[0])
        # stored with the weights: serving feeds raw features, the model normalises them
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", torch.clamp(std.detach().clone().float(), min=1e-6))
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

"""Fitting the fraud MLP: seeded, deterministic on CPU, early-stopped on validation PR-AUC.

Class imbalance: frauds are weighted by negatives/positives in the loss (``pos_weight``). That
shifts the learned logit by log(pos_weight), so after training the output layer's bias is
lowered by exactly that amount (prior correction): the exported model's probabilities are then
calibrated again, which the registry's gate checks (calibration error) and the decision
threshold relies on.

Determinism: ``deterministic_torch`` seeds torch, fixes the thread count and switches on
deterministic algorithms; mini-batches are shuffled by a generator seeded from the same seed.
Two runs with the same data and parameters then produce bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from services.shared.evaluation import average_precision
from services.shared.usecase.model import FraudMLP
from services.training.dataset import LabelledSet
from services.training.settings import TrainingParams


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    validation_pr_auc: float
    improved: bool


EpochListener = Callable[[EpochReport], None]


@dataclass
class FittedModel:
    model: FraudMLP
    best_epoch: int
    epochs_run: int
    pos_weight: float
    history: list[EpochReport] = field(default_factory=list)


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seeded, single-path torch for the duration; restores the previous global state."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def scores(model: nn.Module, features: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Fraud probabilities of ``model`` for a feature matrix (eval mode, no gradients)."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch):
            chunk = torch.from_numpy(np.ascontiguousarray(features[start : start + batch]))
            parts.append(model(chunk).reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _normalisation(train: LabelledSet) -> tuple[torch.Tensor, torch.Tensor]:
    values = train.features.astype(np.float64)
    return torch.from_numpy(values.mean(axis=0)), torch.from_numpy(values.std(axis=0))


def fit_fraud_mlp(
    train: LabelledSet,
    validation: LabelledSet,
    params: TrainingParams,
    on_epoch: EpochListener | None = None,
) -> FittedModel:
    """Train a FraudMLP on ``train``, keeping the epoch with the best validation PR-AUC."""
    with deterministic_torch(params.seed, params.torch_threads):
        mean, std = _normalisation(train)
        model = FraudMLP(mean, std, hidden=params.hidden, dropout=params.dropout)
        positives = max(train.positives, 1)
        pos_weight = (
            (len(train) - train.positives) / positives if params.imbalance == "pos_weight" else 1.0
        )
        # per-row losses, weighted by the rows' training weights (recency: window.py)
        loss_fn = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([pos_weight], dtype=torch.float32), reduction="none"
        )
        optimiser = torch.optim.Adam(
            model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
        )
        x = torch.from_numpy(np.ascontiguousarray(train.features, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.float32)).reshape(-1, 1)
        w = torch.from_numpy(np.ascontiguousarray(train.row_weights())).reshape(-1, 1)
        shuffle = torch.Generator().manual_seed(params.seed)
        best_auc = -1.0
        best_state = copy.deepcopy(model.state_dict())
        best_epoch = 0
        history: list[EpochReport] = []
        epoch = 0
        for epoch in range(1, params.epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=shuffle)
            total = 0.0
            for start in range(0, len(train), params.batch_size):
                index = order[start : start + params.batch_size]
                optimiser.zero_grad()
                weight = w[index]
                loss = (loss_fn(model.logits(x[index]), y[index]) * weight).sum() / weight.sum()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
            validation_auc = average_precision(
                validation.labels, scores(model, validation.features)
            )
            improved = validation_auc > best_auc
            if improved:
                best_auc, best_epoch = validation_auc, epoch
                best_state = copy.deepcopy(model.state_dict())
            report = EpochReport(epoch, params.epochs, total / len(train), validation_auc, improved)
            history.append(report)
            if on_epoch is not None:
                on_epoch(report)
            if epoch - best_epoch >= params.patience:
                break
        model.load_state_dict(best_state)
        if pos_weight != 1.0:
            output = model.net[-1]
            assert isinstance(output, nn.Linear)
            with torch.no_grad():  # prior correction (module docstring)
                output.bias.sub_(math.log(pos_weight))
        model.eval()
        return FittedModel(model, best_epoch, epoch, pos_weight, history)


def torchscript_bytes(model: nn.Module) -> bytes:
    """The model as a TorchScript file (what Triton, the gate and tests load; no pickle)."""
    # TorchScript is deprecated in favour of torch.export, but it is what Triton's Python
    # backend and the registry load without the model's code and without pickle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model.eval())
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def load_torchscript(payload: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.load(io.BytesIO(payload), map_location="cpu")
    return module


def weights_sha256(model: nn.Module) -> str:
    """A hash of the state dict's names, dtypes, shapes and bytes (bit-identical weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()

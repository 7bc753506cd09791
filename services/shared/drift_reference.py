"""A model version's drift reference: a sample of its training data, stored with its artifacts.

Training writes it (``build_reference`` -> ``to_parquet``) as the run artifact
``REFERENCE_ARTIFACT`` with its sha256 in the run tag ``TAG_REFERENCE_SHA256``; monitoring
reads it back (``DriftReference.from_parquet`` refuses a file whose checksum differs) when the
version becomes production, and measures the live inputs and scores against it. One module
names the file and its columns so the two sides cannot drift apart.

Columns: every model input (by name), ``score`` (the model's fraud probability on that row),
``label`` (0/1) and ``held_out`` (the row is from the validation or test period, which the
model never trained on: its scores are the honest reference for live scores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.shared.errors import IntegrityError, InvalidArgument

REFERENCE_ARTIFACT = "monitoring/reference.parquet"
TAG_REFERENCE_SHA256 = "mlops.reference_sha256"
SCORE_COLUMN = "score"
LABEL_COLUMN = "label"
HELD_OUT_COLUMN = "held_out"


@dataclass(frozen=True)
class DriftReference:
    """Rows of a version's training data: inputs (rows x names), scores, labels."""

    input_names: tuple[str, ...]
    inputs: np.ndarray  # float64, rows x len(input_names)
    scores: np.ndarray  # float64
    labels: np.ndarray  # int8
    held_out: np.ndarray  # bool

    def __post_init__(self) -> None:
        rows = self.inputs.shape[0]
        if self.inputs.ndim != 2 or self.inputs.shape[1] != len(self.input_names):
            raise InvalidArgument("inputs", "must be rows x len(input_names)")
        if not (len(self.scores) == len(self.labels) == len(self.held_out) == rows):
            raise InvalidArgument("scores", "scores, labels and held_out must have one per row")

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])

    def column(self, name: str) -> np.ndarray:
        return self.inputs[:, self.input_names.index(name)]

    def to_parquet(self) -> bytes:
        columns: dict[str, np.ndarray] = {
            name: self.inputs[:, i] for i, name in enumerate(self.input_names)
        }
        columns[SCORE_COLUMN] = self.scores
        columns[LABEL_COLUMN] = self.labels.astype(np.int8)
        columns[HELD_OUT_COLUMN] = self.held_out.astype(bool)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink)
        return bytes(sink.getvalue().to_pybytes())

    @classmethod
    def from_parquet(
        cls, payload: bytes, input_names: Sequence[str], *, sha256: str | None = None
    ) -> DriftReference:
        """Read a reference written by ``to_parquet``; ``sha256``: refuse any other file."""
        if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256.strip().lower():
            raise IntegrityError("the drift reference does not match its recorded sha256")
        table = pq.read_table(pa.BufferReader(payload))
        missing = [
            c
            for c in (*input_names, SCORE_COLUMN, LABEL_COLUMN, HELD_OUT_COLUMN)
            if c not in table.column_names
        ]
        if missing:
            raise InvalidArgument("reference", f"lacks the columns {', '.join(missing)}")
        inputs = np.column_stack(
            [table.column(n).to_numpy(zero_copy_only=False) for n in input_names]
        ).astype(np.float64)
        return cls(
            input_names=tuple(input_names),
            inputs=inputs,
            scores=table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64),
            labels=table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.int8),
            held_out=table.column(HELD_OUT_COLUMN).to_numpy(zero_copy_only=False).astype(bool),
        )


def build_reference(
    input_names: Sequence[str],
    inputs: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    held_out: np.ndarray,
    *,
    max_rows: int,
    seed: int,
) -> DriftReference:
    """A uniform random sample (without replacement, in the original row order) of at most
    ``max_rows`` rows; deterministic for a seed, so a reproduced run writes the same file."""
    rows = len(scores)
    keep = np.arange(rows)
    if rows > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return DriftReference(
        input_names=tuple(input_names),
        inputs=np.asarray(inputs, dtype=np.float64)[keep],
        scores=np.asarray(scores, dtype=np.float64).reshape(-1)[keep],
        labels=np.asarray(labels).reshape(-1)[keep].astype(np.int8),
        held_out=np.asarray(held_out, dtype=bool).reshape(-1)[keep],
    )

"""What a training run in MLflow must hold for the registry to register it.

The trainer writes these artifacts and tags; the registry reads them back, verifies the model's
checksum and gates it on the held-out test set. One module names them so the two sides cannot
drift apart. Importing it is cheap (no mlflow, no torch).
"""

from __future__ import annotations

from services.shared.usecase.features import MODEL_INPUTS

# artifacts (paths inside the run's artifact root)
MODEL_ARTIFACT = "model/model.pt"  # TorchScript; no pickle anywhere
MODEL_CARD_ARTIFACT = "model_card.md"
TEST_SET_ARTIFACT = "evaluation/test_set.parquet"  # MODEL_INPUTS + LABEL_COLUMN + TIME_COLUMN
METRICS_ARTIFACT = "metrics.json"
LABEL_COLUMN = "label"
TIME_COLUMN = "event_time"
TEST_SET_COLUMNS: tuple[str, ...] = (*MODEL_INPUTS, LABEL_COLUMN, TIME_COLUMN)

# run tags
TAG_MODEL_SHA256 = "mlops.model_sha256"  # of the TorchScript file
TAG_WEIGHTS_SHA256 = "mlops.weights_sha256"  # of the state dict (reproducibility check)
TAG_THRESHOLD = "mlops.threshold"
TAG_FEATURE_NAMES = "mlops.feature_names"  # JSON list, the model's input columns in order
TAG_SNAPSHOT_ID = "mlops.dataset_snapshot_id"
TAG_SNAPSHOT_SHA256 = "mlops.dataset_sha256"
TAG_FEATURE_SERVICE = "mlops.feature_service"
TAG_FEATURE_DEFINITIONS_SHA256 = "mlops.feature_definitions_sha256"
TAG_CODE_COMMIT = "mlops.code_commit"
TAG_CODE_DIRTY = "mlops.code_dirty"
TAG_REQUEST_ID = "mlops.training_request_id"
TAG_REQUEST_REASON = "mlops.training_reason"
TAG_REQUESTED_BY = "mlops.requested_by"
# gate tests the request's requester may spend on one shift (RetrainRequest.gate_tests): the
# gate splits its error rate over them
TAG_GATE_TESTS = "mlops.gate_tests"
TAG_ENV_PREFIX = "mlops.env."  # mlops.env.python, mlops.env.torch, ...

# metric names on the run: "<split>_<metric>" for the model, "baseline_<split>_<metric>"
TEST_PREFIX = "test_"
BASELINE_TEST_PREFIX = "baseline_test_"

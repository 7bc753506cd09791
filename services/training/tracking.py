"""Experiment tracking in MLflow: one run per training, with everything lineage needs.

Only the tracking client is used (``MlflowClient``): parameters, metrics (with per-epoch
history), tags and plain artifacts. The TorchScript model is logged as a file, not through
``mlflow.pytorch.log_model`` (which pickles and spends seconds inferring requirements).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.shared.errors import AlreadyExists
from services.shared.logging import get_logger
from services.shared.mlflow_client import MlflowConnection, RunView, run_view
from services.shared.settings import MlflowSettings

log = get_logger("training.tracking")

TAG_REGISTERED_VERSION = "mlops.registered_version"


@dataclass
class RunRecord:
    """What one training run logs."""

    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: dict[str, bytes]  # relative artifact path -> content
    metric_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class ExperimentTracker:
    """Writes and finds training runs in the configured MLflow experiment."""

    def __init__(self, settings: MlflowSettings) -> None:
        self.settings = settings
        self.mlflow = MlflowConnection(settings)
        self._experiment_id: str | None = None

    @property
    def client(self) -> Any:
        return self.mlflow.client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.settings.experiment
            experiment = self.mlflow.call(
                f"find experiment {name}", self.client.get_experiment_by_name, name
            )
            if experiment is not None:
                self._experiment_id = str(experiment.experiment_id)
            else:
                try:
                    self._experiment_id = str(
                        self.mlflow.call_once(
                            f"create experiment {name}", self.client.create_experiment, name
                        )
                    )
                except AlreadyExists:  # another trainer created it meanwhile
                    return self.experiment_id()
        return self._experiment_id

    def log_run(self, record: RunRecord) -> str:
        """Create a finished run holding ``record``; returns its id."""
        return self.mlflow.call_once("log the run", self._log_run, record)

    def _log_run(self, record: RunRecord) -> str:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        run = client.create_run(self.experiment_id(), tags=record.tags, run_name=record.run_name)
        run_id = run.info.run_id
        try:
            timestamp = run.info.start_time
            metrics = [Metric(k, float(v), timestamp, 0) for k, v in record.metrics.items()]
            for key, points in record.metric_history.items():
                metrics += [Metric(key, float(v), timestamp, step) for step, v in points]
            for start in range(0, len(metrics), 900):  # MLflow's batch limit is 1000
                client.log_batch(run_id, metrics=metrics[start : start + 900])
            client.log_batch(
                run_id,
                params=[Param(k, v) for k, v in record.params.items()],
                tags=[RunTag(k, v) for k, v in record.tags.items()],
            )
            with tempfile.TemporaryDirectory(prefix="mlops-run-") as tmp:
                root = Path(tmp)
                for relative, content in record.artifacts.items():
                    target = root / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                client.log_artifacts(run_id, str(root))
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
        log.info("run_logged", run_id=run_id, experiment=self.settings.experiment)
        return run_id

    def mark_registered(self, run_id: str, version: int) -> None:
        self.mlflow.call(
            "tag the run", self.client.set_tag, run_id, TAG_REGISTERED_VERSION, str(version)
        )

    def find_run(self, tag: str, value: str) -> RunView | None:
        """The latest finished run whose ``tag`` equals ``value``, if any."""
        escaped = value.replace("'", "\\'")
        runs = self.mlflow.call(
            "search runs",
            self.client.search_runs,
            [self.experiment_id()],
            filter_string=f"tags.`{tag}` = '{escaped}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return run_view(runs[0]) if runs else None

    def download(self, run_id: str, artifact_path: str) -> bytes:
        return self.mlflow.download(run_id, artifact_path)

    def get_run(self, run_id: str) -> RunView:
        return self.mlflow.run(run_id)

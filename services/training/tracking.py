"""Experiment tracking in MLflow: one run per training, with everything lineage needs.

Only the tracking client is used (``MlflowClient``): parameters, metrics (with per-epoch
history), tags and plain artifacts. The TorchScript model is logged as a file, not through
``mlflow.pytorch.log_model`` (which pickles and spends seconds inferring requirements).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from services.shared.errors import NotFound, Unavailable
from services.shared.logging import get_logger
from services.shared.settings import MlflowSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = get_logger("training.tracking")
T = TypeVar("T")

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


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]


class ExperimentTracker:
    """Writes and finds training runs in the configured MLflow experiment."""

    def __init__(self, settings: MlflowSettings) -> None:
        self.settings = settings
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.tracking_uri
            )
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            try:
                experiment = self.client.get_experiment_by_name(self.settings.experiment)
                self._experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else self.client.create_experiment(self.settings.experiment)
                )
            except MlflowException as exc:
                raise Unavailable(
                    f"MLflow at {self.settings.tracking_uri} failed: {exc.message}"
                ) from exc
        return self._experiment_id

    def log_run(self, record: RunRecord) -> str:
        """Create a finished run holding ``record``; returns its id."""
        return _mlflow_call("log the run", self._log_run, record)

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
        _mlflow_call(
            "tag the run", self.client.set_tag, run_id, TAG_REGISTERED_VERSION, str(version)
        )

    def find_run(self, tag: str, value: str) -> TrackedRun | None:
        """The latest finished run whose ``tag`` equals ``value``, if any."""
        escaped = value.replace("'", "\\'")
        runs = _mlflow_call(
            "search runs",
            self.client.search_runs,
            [self.experiment_id()],
            filter_string=f"tags.`{tag}` = '{escaped}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return _tracked(runs[0]) if runs else None

    def download(self, run_id: str, artifact_path: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="mlops-artifact-") as tmp:
            local = _mlflow_call(
                f"download {artifact_path}",
                self.client.download_artifacts,
                run_id,
                artifact_path,
                tmp,
            )
            return Path(local).read_bytes()

    def get_run(self, run_id: str) -> TrackedRun:
        return _tracked(_mlflow_call(f"get run {run_id}", self.client.get_run, run_id))


def _mlflow_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """MLflow's errors as the platform's: a run that cannot be read is NotFound, anything
    else (server down, timeouts) Unavailable, so the consumer retries the request later."""
    from mlflow.exceptions import MlflowException, RestException

    try:
        return fn(*args, **kwargs)
    except RestException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise NotFound(f"MLflow could not {what}: {exc.message}") from exc
        raise Unavailable(f"MLflow could not {what}: {exc.message}") from exc
    except MlflowException as exc:
        raise Unavailable(f"MLflow could not {what}: {exc.message}") from exc
    except OSError as exc:  # connection refused / reset below MLflow's own handling
        raise Unavailable(f"MLflow could not {what}: {exc}") from exc


def _tracked(run: Any) -> TrackedRun:
    return TrackedRun(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )

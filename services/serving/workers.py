"""Several serving processes on one port, for a host with more cores than one process can use.

One Python process serves gRPC on one core (the GIL). With ``MLOPS_SERVING_WORKERS=N`` the
process started as ``python -m services.serving`` becomes a small parent that:

- starts N workers, each a complete serving instance (``python -m services.serving`` with
  ``MLOPS_SERVING_WORKER_INDEX`` set): its own micro-batcher, Redis pool, Triton channel,
  Kafka producer and routing follower; all bind the gRPC port with SO_REUSEPORT and the kernel
  spreads client connections over them (each connection stays with one worker);
- serves the workers' metrics, summed, on the service's metrics port (prometheus_client's
  multiprocess mode, in a directory of its own);
- stops them all on SIGTERM/SIGINT, and stops the rest and exits non-zero if one dies, so
  the supervisor (supervisord, Kubernetes) restarts the whole service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from services.serving.settings import ServingSettings
from services.shared.logging import configure_logging, get_logger

log = get_logger("serving.workers")

_STOP_TIMEOUT_S = 15.0


class WorkerPool:
    """The worker processes and the aggregated metrics endpoint."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.metrics_dir = tempfile.mkdtemp(prefix="mlops-serving-metrics-")
        self.processes: list[subprocess.Popen[bytes]] = []
        self._stopping = False

    def _environment(self, index: int) -> dict[str, str]:
        # the workers inherit this process's configuration; what differs is set here
        return {
            **os.environ,
            "MLOPS_SERVING_WORKER_INDEX": str(index),
            "MLOPS_SERVING_METRICS_PORT": "0",  # the parent serves their metrics
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
        }

    def start(self) -> int:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        server, _thread = start_http_server(
            self.settings.metrics_port, addr=self.settings.metrics_host, registry=registry
        )
        for index in range(self.settings.workers):
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.serving"], env=self._environment(index)
                )
            )
        log.info(
            "workers_started",
            workers=self.settings.workers,
            pids=",".join(str(p.pid) for p in self.processes),
            metrics_port=server.server_address[1],
        )
        return int(server.server_address[1])

    def stop(self, *_: object) -> None:
        self._stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """Until every worker has exited; non-zero if one exited without being asked to."""
        failed = False
        while any(p.poll() is None for p in self.processes):
            for process in self.processes:
                code = process.poll()
                if code is not None and not self._stopping:
                    log.error("worker_exited", pid=process.pid, code=code)
                    failed = True
                    self.stop()
            time.sleep(0.2)
        for process in self.processes:
            multiprocess.mark_process_dead(process.pid, self.metrics_dir)
        return 1 if failed else 0

    def close(self) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def run_workers(settings: ServingSettings) -> int:
    configure_logging(settings.log.level, settings.log.format)
    pool = WorkerPool(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("workers_stopping", signal=signal.Signals(signum).name)
        pool.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pool.start()
        return pool.wait()
    finally:
        pool.stop()
        pool.close()

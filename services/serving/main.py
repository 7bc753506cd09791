"""Entry point of the serving service: ``python -m services.serving``.

Reads ``ServingSettings`` and runs one serving process, or (``MLOPS_SERVING_WORKERS`` > 1) the
small supervisor of several. The heavy imports (Feast, tritonclient, aiokafka) happen only in
the process that serves, so the supervisor starts its workers at once.
"""

from __future__ import annotations

from services.serving.settings import ServingSettings

SERVICE = "serving"


def main() -> int:
    settings = ServingSettings()
    if settings.workers > 1 and settings.worker_index < 0:
        from services.serving.workers import run_workers

        return run_workers(settings)
    from services.serving.app import serve
    from services.shared.runtime import run_service

    return run_service(SERVICE, settings, lambda stop: serve(settings, stop))

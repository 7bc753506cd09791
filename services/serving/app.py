"""The serving service wired from ``ServingSettings``: every part built, started, stopped.

Start order: the Feast registry is read for the feature layout (waiting until the feature
definitions are applied), then the gRPC server starts NOT_SERVING; the routing follower
(registry + models.lifecycle) and the health probe turn it SERVING once a version is routable
and Triton scores it.
"""

from __future__ import annotations

import asyncio
import gc

from services.serving.health import ServingHealth
from services.serving.online_features import LayoutCache, OnlineFeatureLayout, OnlineFeatureReader
from services.serving.prediction_log import PredictionLog
from services.serving.predictor import Predictor
from services.serving.routing import CanaryRouter
from services.serving.routing_source import RoutingFollower
from services.serving.scoring import TritonScorer
from services.serving.servicer import SERVICE_NAME, PredictorServicer
from services.serving.settings import ServingSettings
from services.shared.featurestore import open_store
from services.shared.grpc_server import GrpcServer
from services.shared.kafka import create_producer
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import predictor_pb2_grpc
from services.shared.retry import pause
from services.shared.runtime import set_ready
from services.shared.topics import Topics

log = get_logger("serving")

SERVICE = "serving"


async def load_feature_layout(
    settings: ServingSettings, stop: asyncio.Event
) -> OnlineFeatureLayout | None:
    """The feature service's layout from the Feast registry; waits until it is applied.

    Taken from the layout cache while the registry is unchanged: importing Feast would cost
    a restarted process seconds before it answers."""
    cache = LayoutCache(
        settings.storage.data_dir / "serving" / "feature-layout.json",
        settings.storage.feast_registry_path,
        settings.feast.feature_service,
    )
    cached = await asyncio.to_thread(cache.read)
    if cached is not None:
        log.info("feature_layout_cached", path=str(cache.path))
        return cached
    layout = await _layout_from_registry(settings, stop)
    if layout is not None:
        await asyncio.to_thread(cache.write, layout)
    return layout


async def _layout_from_registry(
    settings: ServingSettings, stop: asyncio.Event
) -> OnlineFeatureLayout | None:
    from feast.errors import FeastObjectNotFoundException

    store = await asyncio.to_thread(open_store, settings.feast, settings.redis, settings.storage)
    while not stop.is_set():
        try:
            return await asyncio.to_thread(
                OnlineFeatureLayout.from_store, store, settings.feast.feature_service
            )
        except FeastObjectNotFoundException as exc:
            log.warning("feature_definitions_missing", error=str(exc))
        if await pause(stop, settings.registry_retry_interval_s):
            break
        await asyncio.to_thread(store.refresh_registry)
    return None


class ServingApp:
    """Every part of the serving service, built from settings; ``start`` then ``stop``."""

    def __init__(self, settings: ServingSettings, layout: OnlineFeatureLayout) -> None:
        self.settings = settings
        topics = Topics.from_settings(settings.kafka)
        self.router = CanaryRouter()
        self.features = OnlineFeatureReader(
            settings.redis,
            layout,
            timeout_s=settings.feature_timeout_ms / 1000.0,
            retry_interval_s=settings.feature_retry_interval_ms / 1000.0,
            pool_size=settings.redis_pool_size,
        )
        self.scorer = TritonScorer(settings.triton, settings.registry.model_name)
        self.prediction_log = PredictionLog(
            lambda: create_producer(settings.kafka, client_id="serving-predictions", linger_ms=20),
            topics.predictions,
            capacity=settings.prediction_log_capacity,
            dlq_topic=topics.dlq,
            max_record_bytes=settings.kafka.max_record_bytes,
            drain_interval_s=settings.prediction_log_flush_ms / 1000.0,
        )
        self.predictor = Predictor(
            model_name=settings.registry.model_name,
            router=self.router,
            features=self.features,
            scorer=self.scorer,
            prediction_log=self.prediction_log,
            batch_max_size=settings.batch_max_size,
            max_batch_requests=settings.max_batch_requests,
            batch_max_delay_s=settings.batch_max_delay_ms / 1000.0,
            batch_max_in_flight=settings.batch_max_in_flight,
            default_timeout_s=settings.default_timeout_ms / 1000.0,
            deadline_margin_s=settings.deadline_margin_ms / 1000.0,
            deadline_margin_fraction=settings.deadline_margin_fraction,
            degrade_without_features=settings.on_feature_store_unavailable == "degrade",
            shadow_max_inflight=settings.shadow_max_inflight,
            shadow_replay_s=settings.shadow_replay_s,
            shadow_replay_max_rows=settings.shadow_replay_max_rows,
            switch_wait_s=settings.switch_wait_ms / 1000.0,
        )
        self.server = GrpcServer(
            host=settings.host,
            port=settings.port,
            service_names=[SERVICE_NAME],
            reuse_port=settings.workers > 1,
            tls=settings,
        )
        predictor_pb2_grpc.add_PredictorServicer_to_server(
            PredictorServicer(self.predictor), self.server.server
        )
        self.routing = RoutingFollower(
            self.router,
            registry=settings.registry,
            kafka=settings.kafka,
            lifecycle_topic=topics.lifecycle,
            retry_interval_s=settings.registry_retry_interval_s,
        )
        self.health = ServingHealth(
            self.predictor, self._publish_health, interval_s=settings.health_interval_s
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        return self.server.port

    async def _publish_health(self, serving: bool) -> None:
        await self.server.health.set(serving)
        set_ready(SERVICE, serving)

    async def start(self) -> None:
        self.prediction_log.start()
        await self.server.start(serving=False)
        self._tasks = [
            asyncio.create_task(self.routing.run(self._stop), name="serving-routing"),
            asyncio.create_task(self.health.run(self._stop), name="serving-health"),
        ]
        log.info("serving_started", port=self.port, model=self.settings.registry.model_name)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        await self.server.stop(grace_s)  # in-flight calls finish first
        await self.predictor.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.prediction_log.close()
        await self.features.close()
        await self.scorer.close()


async def serve(settings: ServingSettings, stop: asyncio.Event) -> None:
    layout = await load_feature_layout(settings, stop)
    if layout is None:
        return
    app = ServingApp(settings, layout)
    # what start-up built (Feast, protobuf descriptors, numpy) lives as long as the process:
    # keep it out of the garbage collector's generations, so collections stay short
    gc.collect()
    gc.freeze()
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()

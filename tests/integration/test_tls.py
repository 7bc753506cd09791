"""TLS by configuration, against real servers and a throwaway CA made in the test: the gRPC
servers (serving, registry) with TLS and mutual TLS, their plaintext health-only port, the
registry client and the health-check command; Kafka clients over TLS to the real (Tansu)
broker behind a TLS endpoint. Without any of it configured everything stays plaintext (the
rest of the suite runs that way)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_material import ThrowawayCA

from services.cli import healthcheck, localinfra
from services.shared.errors import Unavailable
from services.shared.kafka import (
    create_consumer,
    create_producer,
    ensure_topics,
    faust_credentials,
    security_options,
)
from services.shared.settings import GrpcTlsSettings, KafkaSettings, RegistryClientSettings
from services.shared.tls import channel_credentials, registry_channel

SERVICE = "mlops.v1.ModelRegistry"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = ThrowawayCA(tmp_path / "ca", "platform-ca")
    other = ThrowawayCA(tmp_path / "other", "someone-elses-ca")
    files = {"ca": ca.cert_file, "other_ca": other.cert_file}
    for name, authority in (("server", ca), ("client", ca), ("stranger", other)):
        files[name] = authority.issue(name)
        files[f"{name}_key"] = authority.key_file(name)
    return files


@contextlib.asynccontextmanager
async def grpc_server(tls: GrpcTlsSettings) -> AsyncIterator[tuple[int, int]]:
    from services.shared.grpc_server import GrpcServer

    server = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], tls=tls)
    await server.start()
    try:
        yield server.port, server.health_port
    finally:
        await server.stop(0)


def status(port: int, credentials: grpc.ChannelCredentials | None) -> str | None:
    return healthcheck.grpc_health_status(
        f"127.0.0.1:{port}", timeout_s=3.0, credentials=credentials, server_name="localhost"
    )


async def test_grpc_server_speaks_tls_only_when_a_certificate_is_configured(
    pki: dict[str, Path],
) -> None:
    tls = GrpcTlsSettings(
        tls_cert_file=pki["server"], tls_key_file=pki["server_key"], health_port=0
    )
    async with grpc_server(tls) as (port, _):
        trusted = channel_credentials(pki["ca"])
        assert await asyncio.to_thread(status, port, trusted) == "SERVING"
        # plaintext clients and clients that do not trust the server's CA get nothing
        assert await asyncio.to_thread(status, port, None) is None
        assert await asyncio.to_thread(status, port, channel_credentials(pki["other_ca"])) is None
        # the health-check command of the containers, with and without the CA
        address = f"127.0.0.1:{port}"
        ok = ["grpc", address, "--tls-ca", str(pki["ca"]), "--server-name", "localhost"]
        assert await asyncio.to_thread(healthcheck.main, ok) == 0
        assert await asyncio.to_thread(healthcheck.main, ["grpc", address]) == 1

    async with grpc_server(GrpcTlsSettings()) as (plain_port, health_port):
        assert health_port == 0
        assert await asyncio.to_thread(status, plain_port, None) == "SERVING"  # the local stack


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    pki: dict[str, Path],
) -> None:
    tls = GrpcTlsSettings(
        tls_cert_file=pki["server"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]
    )
    async with grpc_server(tls) as (port, _):
        with_cert = channel_credentials(pki["ca"], pki["client"], pki["client_key"])
        assert await asyncio.to_thread(status, port, with_cert) == "SERVING"
        without_cert = channel_credentials(pki["ca"])
        assert await asyncio.to_thread(status, port, without_cert) is None
        foreign_cert = channel_credentials(pki["ca"], pki["stranger"], pki["stranger_key"])
        assert await asyncio.to_thread(status, port, foreign_cert) is None

        # the registry's clients (training, serving, the CLI) from their settings
        def check_through_registry_channel(settings: RegistryClientSettings) -> str:
            channel = registry_channel(settings)
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=3.0
                )
            finally:
                channel.close()
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

        client = RegistryClientSettings(
            address=f"127.0.0.1:{port}",
            tls_ca_file=pki["ca"],
            tls_cert_file=pki["client"],
            tls_key_file=pki["client_key"],
            tls_server_name="localhost",
        )
        assert await asyncio.to_thread(check_through_registry_channel, client) == "SERVING"
        no_tls = RegistryClientSettings(address=f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(check_through_registry_channel, no_tls)


async def test_health_port_is_plaintext_and_serves_nothing_but_health(
    pki: dict[str, Path],
) -> None:
    health = localinfra.free_port()
    tls = GrpcTlsSettings(
        tls_cert_file=pki["server"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
        health_port=health,
    )
    async with grpc_server(tls) as (port, health_port):
        assert health_port == health != port
        assert await asyncio.to_thread(status, health_port, None) == "SERVING"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/ListModelVersions")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(b"", timeout=3.0)
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------------- Kafka


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
def tls_broker(pki: dict[str, Path], tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A real broker whose only advertised listener is a TLS endpoint (Tansu's own TLS
    options do not work in the build available here, so TLS ends in front of it, as it would
    at a load balancer). Yields (the TLS port, the broker's own plaintext port)."""
    tls_port, broker_port = localinfra.free_port(), localinfra.free_port()
    spec = localinfra.ProcessSpec(
        name="kafka",
        command=[
            str(localinfra.tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{broker_port}",
            # clients are told to come back through the TLS endpoint, by the certificate's name
            "--advertised-listener-url",
            f"tcp://localhost:{tls_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        ready=lambda: localinfra.port_open("127.0.0.1", broker_port),
        startup_timeout_s=20,
    )
    process = localinfra.RunningProcess(spec, tmp_path / "tansu.log")
    try:
        yield tls_port, broker_port
    finally:
        process.stop()


async def test_kafka_clients_produce_and_consume_over_tls(
    pki: dict[str, Path], tls_broker: tuple[int, int]
) -> None:
    tls_port, broker_port = tls_broker
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server"], pki["server_key"])

    async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", broker_port)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    endpoint = await asyncio.start_server(terminate, "127.0.0.1", tls_port, ssl=context)
    kafka = KafkaSettings(
        bootstrap=f"localhost:{tls_port}",
        broker_flavor="tansu",
        partitions=1,
        session_timeout_ms=6000,
        security_protocol="SSL",
        ssl_ca_file=pki["ca"],
    )
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    try:
        await ensure_topics(kafka, [topic], timeout_s=20)
        producer = create_producer(kafka, client_id="tls-test", linger_ms=0)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"over tls", key=b"k")
        finally:
            await producer.stop()
        consumer = create_consumer(kafka, topic, group_id=None, client_id="tls-test")
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=10_000)
            values = [r.value for records in batch.values() for r in records]
        finally:
            await consumer.stop()
        assert values == [b"over tls"]

        # a client that does not trust the CA cannot even bootstrap
        untrusting = kafka.model_copy(update={"ssl_ca_file": pki["other_ca"]})
        with pytest.raises(Unavailable):
            await ensure_topics(untrusting, [topic], timeout_s=2)
    finally:
        endpoint.close()
        await endpoint.wait_closed()


async def test_sasl_settings_reach_aiokafka_and_faust(pki: dict[str, Path]) -> None:
    """SASL needs a broker with SCRAM users, which is not available here: the settings are
    checked as far as the clients' own option handling (aiokafka's arguments; faust's
    conversion of its credentials into the same arguments)."""
    from aiokafka import AIOKafkaProducer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    kafka = KafkaSettings(
        bootstrap="broker:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="mlops-platform",
        sasl_password="s3cret",  # type: ignore[arg-type]
        ssl_ca_file=pki["ca"],
    )
    options = security_options(kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "mlops-platform",
        "s3cret",
    )
    issuers = [dict(x[0] for x in c["issuer"]) for c in options["ssl_context"].get_ca_certs()]
    assert {"commonName": "platform-ca"} in issuers
    # aiokafka accepts them (it validates the combination at construction)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, **options)
    assert producer.client._sasl_mechanism == "SCRAM-SHA-512"
    await producer.stop()
    faust_options = credentials_to_aiokafka_auth(faust_credentials(kafka))
    assert faust_options["security_protocol"] == "SASL_SSL"
    assert faust_options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert faust_options["sasl_plain_password"] == "s3cret"
    assert faust_options["ssl_context"] is not None
    assert faust_credentials(KafkaSettings()) is None  # plaintext: faust as before
    assert security_options(KafkaSettings()) == {"security_protocol": "PLAINTEXT"}

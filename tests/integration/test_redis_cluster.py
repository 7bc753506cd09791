"""Feast's online store on a real Redis Cluster (three Debian redis-server masters joined by
``redis-cli --cluster create``, with a password, as the prod overlay runs it) and on a Redis
that speaks TLS only: the features service's write path (Feast's ``redis_type:
redis_cluster``, services/shared/feast_online.py) and serving's reader
(services/serving/online_features.py) agree with Feast's own reads."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from feast.data_source import PushMode
from pydantic import SecretStr
from tls_material import ThrowawayCA

from services.cli import localinfra
from services.ingestion.claims import connect
from services.serving.online_features import OnlineFeatureLayout, OnlineFeatureReader
from services.shared.featurestore import apply_definitions, open_store
from services.shared.settings import FeastSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES

PASSWORD = "cluster-test-password"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster-bus port (port + 10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSettings]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    ports = _cluster_ports(3)
    processes = []
    try:
        for port in ports:
            directory = tmp_path_factory.mktemp(f"redis-{port}")
            spec = localinfra.ProcessSpec(
                name=f"redis-{port}",
                command=[
                    binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--dir", str(directory),
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    # generous: on a loaded machine a short timeout marks live nodes failed
                    "--cluster-node-timeout", "15000",
                    "--requirepass", PASSWORD,
                    "--masterauth", PASSWORD,
                    "--save", "",
                    "--appendonly", "no",
                ],
                ready=lambda port=port: localinfra.port_open("127.0.0.1", port),
                startup_timeout_s=20,
            )  # fmt: skip
            processes.append(localinfra.RunningProcess(spec, directory / "redis.log"))
        subprocess.run(
            [cli, "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        # every node must see the cluster formed (gossip reaches them one by one)
        nodes = [redis.Redis(host="127.0.0.1", port=p, password=PASSWORD) for p in ports]
        localinfra.wait_until(
            lambda: all(n.cluster("info").get("cluster_state") == "ok" for n in nodes),
            timeout_s=60,
            what="every node of the Redis Cluster to see it formed",
        )
        for node in nodes:
            node.close()
        yield RedisSettings(
            host="127.0.0.1",
            port=ports[0],
            cluster=True,
            password=PASSWORD,  # type: ignore[arg-type]
        )
    finally:
        for process in processes:
            process.stop()


def _push(store: Any, source: str, rows: list[dict[str, Any]], at: datetime) -> None:
    frame = pd.DataFrame(rows)
    frame["event_timestamp"] = at
    frame["created_timestamp"] = at
    store.push(source, frame, to=PushMode.ONLINE)


async def test_features_written_to_the_cluster_are_read_back_by_serving(
    redis_cluster: RedisSettings, feast_settings: FeastSettings, storage: StorageSettings
) -> None:
    store = open_store(feast_settings, redis_cluster, storage)
    assert store.config.online_store.redis_type == "redis_cluster"
    apply_definitions(store, feast_settings, storage.offline_dir)
    now = datetime.now(UTC)
    users = [
        {
            "user_id": f"cu-{i}",
            "user_txn_count_1h": i % 4,
            "user_txn_count_24h": 3 + i,
            "user_amount_sum_24h": 12.5 * (i + 1),
            "user_amount_mean_7d": 20.0 + i,
            "user_distinct_merchants_24h": 1 + i % 3,
            "user_last_txn_epoch": now.timestamp() - 60.0 * (i + 1),
            "user_home_country": ["FR", "DE", "US"][i % 3],
        }
        for i in range(40)  # enough keys to land on every master
    ]
    merchants = [
        {
            "merchant_id": f"cm-{i}",
            "merchant_txn_count_24h": 10 * (i + 1),
            "merchant_fraud_rate_7d": 0.01 * i,
            "merchant_labels_7d": i * 2,
        }
        for i in range(10)
    ]
    _push(store, "user_activity_push", users, now)
    _push(store, "merchant_activity_push", merchants, now)
    # the write path keeps the newest state: an older row for cu-0 changes nothing
    stale = {**users[0], "user_txn_count_24h": 999}
    _push(store, "user_activity_push", [stale], now - timedelta(minutes=5))

    # the keys really are spread over the three masters
    nodes = redis.RedisCluster(
        host=redis_cluster.host, port=redis_cluster.port, password=PASSWORD
    ).get_primaries()
    per_node = [redis.Redis(host=n.host, port=n.port, password=PASSWORD).dbsize() for n in nodes]
    assert len(per_node) == 3 and all(count > 0 for count in per_node), per_node

    rows = [{"user_id": f"cu-{i}", "merchant_id": f"cm-{i % 12}"} for i in range(42)]
    sdk = store.get_online_features(
        store.get_feature_service(feast_settings.feature_service), rows
    ).to_dict()
    reader = OnlineFeatureReader(
        redis_cluster,
        OnlineFeatureLayout.from_store(store, feast_settings.feature_service),
        timeout_s=2.0,
        retry_interval_s=0.1,
        pool_size=4,
    )
    try:
        ours = await reader.read(
            {
                "user_id": [r["user_id"] for r in rows],
                "merchant_id": [r["merchant_id"] for r in rows],
            }
        )
    finally:
        await reader.close()
    assert set(ours) == set(USER_FEATURES) | set(MERCHANT_FEATURES)
    for name, values in ours.items():
        assert values == sdk[name], name
    assert ours["user_txn_count_24h"][0] == 3  # not the stale 999
    assert ours["user_txn_count_24h"][39] == 42
    assert ours["user_txn_count_1h"][40] is None  # cu-40 was never written
    assert ours["merchant_labels_7d"][10] is None  # cm-10 neither


def test_a_wrong_password_is_refused(redis_cluster: RedisSettings) -> None:
    wrong = redis_cluster.model_copy(update={"password": SecretStr("not-it")})
    with pytest.raises(redis.exceptions.RedisClusterException, match="username-password"):
        redis.RedisCluster(host=wrong.host, port=wrong.port, **wrong.client_options())


@pytest.fixture
def redis_tls(tmp_path: Path) -> Iterator[RedisSettings]:
    """One redis-server speaking TLS only (a certificate of a throwaway CA) with a password."""
    ca = ThrowawayCA(tmp_path / "pki")
    cert = ca.issue("redis")
    port = _cluster_ports(1)[0]
    spec = localinfra.ProcessSpec(
        name="redis-tls",
        command=[
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(ca.key_file("redis")),
            "--tls-ca-cert-file", str(ca.cert_file),
            "--tls-auth-clients", "no",
            "--requirepass", PASSWORD,
            "--save", "",
            "--appendonly", "no",
        ],
        ready=lambda: localinfra.port_open("127.0.0.1", port),
        startup_timeout_s=20,
    )  # fmt: skip
    process = localinfra.RunningProcess(spec, tmp_path / "redis.log")
    try:
        yield RedisSettings(
            host="localhost",
            port=port,
            password=PASSWORD,  # type: ignore[arg-type]
            ssl=True,
            ssl_ca_file=ca.cert_file,
        )
    finally:
        process.stop()


async def test_feast_writes_and_serving_reads_over_tls_with_a_password(
    redis_tls: RedisSettings, feast_settings: FeastSettings, storage: StorageSettings
) -> None:
    store = open_store(feast_settings, redis_tls, storage)
    apply_definitions(store, feast_settings, storage.offline_dir)
    now = datetime.now(UTC)
    merchants = [
        {
            "merchant_id": f"tm-{i}",
            "merchant_txn_count_24h": 5 * (i + 1),
            "merchant_fraud_rate_7d": 0.02 * i,
            "merchant_labels_7d": i,
        }
        for i in range(5)
    ]
    _push(store, "merchant_activity_push", merchants, now)
    reader = OnlineFeatureReader(
        redis_tls,
        OnlineFeatureLayout.from_store(store, feast_settings.feature_service),
        timeout_s=2.0,
        retry_interval_s=0.1,
        pool_size=2,
    )
    try:
        ours = await reader.read(
            {"user_id": ["nobody"] * 6, "merchant_id": [f"tm-{i}" for i in range(6)]}
        )
    finally:
        await reader.close()
    assert ours["merchant_txn_count_24h"] == [5, 10, 15, 20, 25, None]
    # ingestion's claims client connects the same way; without TLS nothing answers
    claims = connect(redis_tls)
    assert await claims.ping()
    await claims.close()
    plaintext = redis.Redis(host="127.0.0.1", port=redis_tls.port, password=PASSWORD)
    with pytest.raises(redis.exceptions.ConnectionError):
        plaintext.ping()

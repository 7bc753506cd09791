"""The registry's control-plane token: which calls need it, and no start without one."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from services.registry.main import MUTATING_METHODS, RegistryApp
from services.registry.settings import RegistrySettings
from services.shared.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from services.shared.grpc_server import BearerTokenAuth
from services.shared.proto.mlops.v1 import registry_pb2


def test_every_mutating_rpc_and_no_read_needs_the_token() -> None:
    methods = {m.name for m in registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].methods}
    reads = {m for m in methods if m.startswith(("Get", "List"))}
    assert set(MUTATING_METHODS) == methods - reads
    assert reads == {"ListModelVersions", "GetModelVersion", "GetLineage", "GetRoutingTable"}


@pytest.mark.parametrize("method", MUTATING_METHODS)
def test_missing_and_wrong_tokens_are_told_apart(method: str) -> None:
    auth = BearerTokenAuth("s3cret", MUTATING_METHODS)
    with pytest.raises(Unauthenticated):
        auth.check(method, [])
    with pytest.raises(Unauthenticated):
        auth.check(method, [("authorization", "Basic s3cret")])
    with pytest.raises(PermissionDenied):
        auth.check(method, [("authorization", "Bearer wrong")])
    auth.check(method, [("authorization", "Bearer s3cret")])
    auth.check("ListModelVersions", [])


def test_the_registry_refuses_to_start_without_a_token() -> None:
    with pytest.raises(FailedPrecondition, match="MLOPS_REGISTRY_TOKEN"):
        RegistryApp(RegistrySettings(token=SecretStr("")))


def test_the_token_is_read_from_the_environment_and_never_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLOPS_REGISTRY_TOKEN", "from-env")
    settings = RegistrySettings()
    assert settings.token.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)

"""TLS material for the platform's gRPC servers and clients, read from PEM files.

A server with a certificate and key speaks TLS only; with a client CA as well it requires
every client to present a certificate that CA signed (mutual TLS). Files are read when the
server or channel is built: a rotated certificate (cert-manager renews the Secret, the kubelet
updates the mounted files) takes effect at the next restart of the pod.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from services.shared.errors import FailedPrecondition
from services.shared.settings import GrpcTlsSettings, RegistryClientSettings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the {what} {path}: {exc.strerror}") from exc


def server_credentials(tls: GrpcTlsSettings) -> grpc.ServerCredentials | None:
    """The server's credentials, or None for plaintext (no certificate configured)."""
    if tls.tls_cert_file is None or tls.tls_key_file is None:
        return None
    key = _read(tls.tls_key_file, "TLS private key")
    chain = _read(tls.tls_cert_file, "TLS certificate")
    client_ca = (
        _read(tls.tls_client_ca_file, "client CA bundle")
        if tls.tls_client_ca_file is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials of a TLS channel: trust ``ca_file`` (None: the system's roots), present
    ``cert_file``/``key_file`` when given (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise FailedPrecondition("a client certificate and its key are configured together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA bundle") if ca_file is not None else None,
        private_key=_read(key_file, "client private key") if key_file is not None else None,
        certificate_chain=_read(cert_file, "client certificate") if cert_file is not None else None,
    )


def registry_channel_options(settings: RegistryClientSettings) -> list[tuple[str, str]]:
    if settings.tls_server_name:
        return [("grpc.ssl_target_name_override", settings.tls_server_name)]
    return []


def registry_channel(settings: RegistryClientSettings) -> grpc.Channel:
    """A blocking channel to the registry: TLS when a CA is configured, else plaintext."""
    options = registry_channel_options(settings)
    if settings.tls_ca_file is None:
        return grpc.insecure_channel(settings.address, options=options)
    credentials = channel_credentials(
        settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
    )
    return grpc.secure_channel(settings.address, credentials, options=options)


def registry_aio_channel(settings: RegistryClientSettings) -> grpc.aio.Channel:
    """``registry_channel`` for asyncio code."""
    options = registry_channel_options(settings)
    if settings.tls_ca_file is None:
        return grpc.aio.insecure_channel(settings.address, options=options)
    credentials = channel_credentials(
        settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
    )
    return grpc.aio.secure_channel(settings.address, credentials, options=options)

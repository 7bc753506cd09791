"""Triton's model repository on object storage (S3 API): the registry's publishing target in
production, where Triton reads ``s3://`` repositories itself.

The same layout, checksums and switch as the local directory (triton_repository.py), written
with S3's guarantees instead of a rename: a single PUT is atomic and read-after-write
consistent, so

- a version's files are uploaded first (``model.pt`` with its SHA-256, which the store checks
  against the bytes it received, then ``model.py``), and its ``model.pt.sha256`` last: a
  version is complete when that file exists and matches ``model.pt``;
- ``config.pbtxt`` (one object, written in one PUT) names a version only after the version is
  complete and verified; Triton loads what the config names, when the registry asks it to.

So Triton never sees a half-written version, and keeps serving the old set until the new one
is ready, exactly as with a directory. The Python backend verifies the checksum again when
Triton loads the version (from its local copy of the repository).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.registry.triton_repository import (
    BACKEND_SOURCE,
    MODEL_FILE,
    TritonModelRepository,
    render_config,
    sha256_hex,
)
from services.shared.errors import FailedPrecondition, IntegrityError, Unavailable
from services.shared.logging import get_logger
from services.shared.settings import ObjectStorageSettings, TritonSettings

log = get_logger("registry.s3")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise FailedPrecondition(f"{url!r} is not an s3://bucket/prefix location")
        return cls(parts.netloc, parts.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def triton_location(triton: TritonSettings, s3: ObjectStorageSettings) -> str:
    """The ``--model-repository`` value that makes Triton read what the registry publishes:
    Triton's own form names a non-AWS endpoint inside the URL (``s3://host:port/bucket/...``,
    ``s3://https://host:port/...`` for TLS)."""
    location = S3Location.parse(triton.model_repository_url)
    path = "/".join(p for p in (location.bucket, location.prefix) if p)
    if not s3.endpoint_url:
        return f"s3://{path}"
    endpoint = urlsplit(s3.endpoint_url)
    scheme = "https://" if endpoint.scheme == "https" else ""
    return f"s3://{scheme}{endpoint.netloc}/{path}"


def s3_client(settings: ObjectStorageSettings) -> Any:
    """A boto3 S3 client; without keys in the settings, boto3's own chain finds them."""
    import boto3
    from botocore.config import Config

    keys: dict[str, str] = {}
    if settings.access_key_id.get_secret_value():
        keys = {
            "aws_access_key_id": settings.access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.secret_access_key.get_secret_value(),
        }
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url or None,
        region_name=settings.region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        **keys,
    )


class S3TritonModelRepository(TritonModelRepository):
    """``TritonModelRepository`` whose files live in a bucket; model control is the same."""

    def __init__(
        self,
        settings: TritonSettings,
        model_name: str,
        storage: ObjectStorageSettings,
        *,
        client: Any = None,
    ) -> None:
        super().__init__(settings, model_name)
        self.location = S3Location.parse(settings.model_repository_url)
        self.storage = storage
        self._client = client or s3_client(storage)

    def _key(self, *parts: str) -> str:
        return self.location.key(self.model_name, *parts)

    def _get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise Unavailable(f"object storage: cannot read {key}: {exc}") from exc
        body: bytes = response["Body"].read()
        return body

    def _put(self, key: str, payload: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        digest = base64.b64encode(hashlib.sha256(payload).digest()).decode()
        try:
            # the store checks the bytes it received against this digest (refuses otherwise)
            self._client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=payload,
                ChecksumSHA256=digest,
            )
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"object storage: cannot write {key}: {exc}") from exc

    def has_version(self, version: int) -> bool:
        return self._get(self._key(str(version), f"{MODEL_FILE}.sha256")) is not None

    def verify_version(self, version: int) -> bool:
        marker = self._get(self._key(str(version), f"{MODEL_FILE}.sha256"))
        if marker is None:
            return False
        payload = self._get(self._key(str(version), MODEL_FILE))
        try:
            recorded = marker.decode().split()[0]
        except (UnicodeDecodeError, IndexError):
            return False
        return payload is not None and sha256_hex(payload) == recorded

    def write_version(self, version: int, torchscript: bytes, sha256: str) -> Any:
        """Upload a version's files after checking ``sha256``; refuses a mismatch."""
        actual = sha256_hex(torchscript)
        if actual != sha256:
            raise IntegrityError(
                f"model {self.model_name} v{version}: artifact sha256 {actual} does not match "
                f"the registered {sha256}; refusing to publish"
            )
        if self.verify_version(version):
            return self._key(str(version))
        self._put(self._key(str(version), MODEL_FILE), torchscript)
        self._put(self._key(str(version), "model.py"), BACKEND_SOURCE.read_bytes())
        # last: its presence (and match) is what makes the version complete
        self._put(
            self._key(str(version), f"{MODEL_FILE}.sha256"), f"{sha256}  {MODEL_FILE}\n".encode()
        )
        if not self.verify_version(version):
            raise IntegrityError(
                f"model {self.model_name} v{version}: the uploaded artifact does not read back "
                "with its checksum"
            )
        log.info(
            "version_written",
            model=self.model_name,
            version=version,
            sha256=sha256,
            location=f"s3://{self.location.bucket}/{self._key(str(version))}",
        )
        return self._key(str(version))

    def write_config(self, versions: list[int], n_inputs: int) -> None:
        if not versions:
            raise ValueError("Triton must serve at least one version")
        text = render_config(
            self.model_name, n_inputs, versions, instance_kind=self.settings.instance_kind
        )
        self._put(self._key("config.pbtxt"), text.encode())


def open_model_repository(
    triton: TritonSettings, storage: ObjectStorageSettings, model_name: str
) -> TritonModelRepository:
    """The repository the settings name: object storage when ``model_repository_url`` is set,
    else the local directory."""
    if triton.model_repository_url:
        return S3TritonModelRepository(triton, model_name, storage)
    return TritonModelRepository(triton, model_name)

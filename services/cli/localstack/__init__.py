"""The platform as local processes under supervisord: what runs, where, and whether it is healthy.

``mlops stack`` (services/cli/stack.py) is the terminal front end; the logic is here, one
module per job:

- ``settings``: ``StackSettings``, the var directory and every port, contract defaults
  (docs/architecture.md), each overridable (``MLOPS_STACK_KAFKA_PORT=19092`` ...), so a second
  stack can run beside the first (the integration test does).
- ``components``: the component table (the infrastructure from services/cli/localinfra.py and
  the platform services, ``python -m services.<name>``); adding a service is one
  ``ServiceSpec`` there.
- ``health``: a health probe per kind of component.
- ``stack``: ``LocalStack``, the stack's files, the one environment every service gets, the
  rendered Prometheus configuration and first-start preparation.
- ``processes``: the stack's processes (found by their environment markers) and who holds a
  port, through psutil.
- ``supervisor``: supervisord's configuration and its XML-RPC interface on its unix socket.
"""

from services.cli.localstack.components import (
    SERVICE_TABLE,
    SERVICES,
    Component,
    Endpoint,
    ServiceSpec,
)
from services.cli.localstack.health import Health
from services.cli.localstack.processes import (
    StackProcess,
    end_processes,
    listener_of,
    stack_processes,
)
from services.cli.localstack.settings import (
    PROGRAM_MARKER,
    STACK_MARKER,
    StackError,
    StackSettings,
)
from services.cli.localstack.stack import LocalStack, load_stack
from services.cli.localstack.supervisor import ProgramState, Supervisor

__all__ = [
    "PROGRAM_MARKER",
    "SERVICES",
    "SERVICE_TABLE",
    "STACK_MARKER",
    "Component",
    "Endpoint",
    "Health",
    "LocalStack",
    "ProgramState",
    "ServiceSpec",
    "StackError",
    "StackProcess",
    "StackSettings",
    "Supervisor",
    "end_processes",
    "listener_of",
    "load_stack",
    "stack_processes",
]

"""``python -m services.registry``: the model registry's gRPC service."""

import sys

from services.registry.main import main

sys.exit(main())

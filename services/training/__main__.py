"""``python -m services.training``: the training service (consumes training.requests)."""

import sys

from services.training.main import main

sys.exit(main())

"""``python -m services.features``."""

import sys

from services.features.main import main

sys.exit(main())

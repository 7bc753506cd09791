"""``python -m services.serving``: the prediction API (mlops.v1.Predictor)."""

import sys

from services.serving.main import main

sys.exit(main())

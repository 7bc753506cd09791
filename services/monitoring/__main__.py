"""``python -m services.monitoring``."""

from services.monitoring.main import main

raise SystemExit(main())

"""``python -m services.dashboard``."""

from services.dashboard.main import main

raise SystemExit(main())

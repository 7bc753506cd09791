"""``python -m services.autopilot``."""

from services.autopilot.main import main

raise SystemExit(main())

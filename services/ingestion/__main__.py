"""``python -m services.ingestion``: run the ingestion service."""

from services.ingestion.main import main

raise SystemExit(main())

"""The operator dashboard: one live page (port 8080) over the platform's metrics, models,
quality, drift and the improvement loop, its JSON API, and the operator actions."""

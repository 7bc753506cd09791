"""The monitoring service: watches what the platform serves (predictions.log) and exports it
to Prometheus. Drift detection and canary comparison come with a later issue."""

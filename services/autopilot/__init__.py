"""The autopilot: the platform's closed loop. It turns drift (and a schedule, and live quality
below a floor) into retraining, judges each gated candidate live (shadow: a paired test on the
transactions both versions scored; canary: errors, latency, degraded answers and Triton
health against production), promotes it or rolls it back, and records every step with its
evidence."""

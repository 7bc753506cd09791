"""Serving: the gRPC prediction API (Feast online features + Triton inference, routed per user)."""

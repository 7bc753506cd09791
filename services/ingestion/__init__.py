"""Ingestion: validates product events, routes them (validated streams / DLQ), archives them."""

"""The example application's HTTP API (FastAPI)."""

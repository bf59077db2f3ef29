"""The HTTP API server (routes, auth, housekeeping)."""

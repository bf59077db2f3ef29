"""Runtimes: ``docker`` (the Docker Engine API) and ``process`` (a plain subprocess, opt-in)."""

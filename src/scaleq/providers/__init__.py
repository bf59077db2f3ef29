"""Providers: where workers live. Each can list, start and stop the workers of a group, and say how it is doing."""

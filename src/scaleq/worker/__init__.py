"""The worker agent and its runtimes."""

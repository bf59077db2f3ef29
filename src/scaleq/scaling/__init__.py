"""Autoscaling: the pure policy, the signals it reads, and the controller that acts on it."""

"""scaleq: a self-hostable compute grid — container jobs on queues, run by worker groups that scale with them."""

__version__ = "0.1.0"

"""``scaleq doctor``: check every hop of the chain and say, in words, what is wrong and how to fix it.

Doctor is two programs sharing one vocabulary, and they sit on different layers (the import-linter contract in
pyproject.toml):

- :mod:`scaleq.doctor.checks`: the :class:`~scaleq.doctor.checks.Check` every check returns and the helpers both
  programs share. It imports nothing else of scaleq, so the server and the CLI can both use it.
- :mod:`scaleq.server.checks`: the checks the server runs over its own store (``GET /api/v1/health``). They read
  the server's store and settings, so they belong to the server.
- :mod:`scaleq.doctor.remote`: what ``scaleq doctor`` runs from anywhere: the server's hops, the server's checks
  above over HTTP and, given a grid file, each group's signal, Prometheus and provider.

This package imports nothing itself: importing :mod:`scaleq.doctor.checks` from the server loads no remote check.
"""

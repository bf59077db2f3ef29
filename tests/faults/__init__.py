"""The fault campaign: real servers, workers and stores, killed at random (seeded), and a ledger that says whether
anything was lost, finished twice or run twice at once.

- :mod:`~tests.faults.ledger`: the records (submit attempts, faults, the jobs' own run marks) and their accounting.
- :mod:`~tests.faults.parts`: the parts a campaign starts, kills and restarts (PostgreSQL, servers, workers).
- :mod:`~tests.faults.campaign`: the two scenarios' drivers (PostgreSQL with two servers; SQLite with the autoscaler).

tests/acceptance/test_fault_campaign.py runs them; SCALEQ_CAMPAIGN_SECONDS makes the fault phase longer.
"""

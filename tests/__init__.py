"""scaleq's tests: ``unit`` (pure parts, no I/O), ``integration`` (a live server, real stores, engines and stand-ins
in the test's process), ``acceptance`` (``scaleq`` as a user runs it, in processes), ``faults`` (the fault campaign's
parts), ``standins`` (the cloud APIs' stand-ins), ``helpers`` (one module an idea).

**Tests must hold on a loaded machine.** The CI machine has two cores and runs PostgreSQL, a Docker Engine and
worker processes beside the suite, so any real-time margin may be eaten. What the suite has learnt:

- Assert on what the test controls. Requests sent together (``asyncio.gather``, tasks) arrive in the network's
  order: a test that needs an order sends them one after the other.
- A lease held across several requests without a heartbeat needs a lease that outlasts the test
  (``tests.helpers.LONG_LEASES``); the default fixture's 2 s leases are for the tests about expiry.
- Where time matters, drive it: a fake clock (``serve(..., clock=...)``), housekeeping called by the test, and
  ``tests.helpers.housekept`` before the clock moves. Where it cannot be driven, hold the event the test looks at
  (an ``asyncio.Event`` the call waits on) rather than hoping it comes late.
- A wait for something that will happen (``eventually``) gets a generous bound, 30 s for a process to start; its
  cost is paid only when the test fails. A fixed sleep followed by an assertion that something has happened is a
  race: wait for it instead.
"""

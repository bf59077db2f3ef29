-- When a lease last got the start-up grace (see extend_leases): a restarting server grants a lease one fresh
-- period only until its worker is heard from again, so restarts cannot keep a dead worker's job running.
ALTER TABLE jobs ADD COLUMN lease_graced_at DOUBLE PRECISION;

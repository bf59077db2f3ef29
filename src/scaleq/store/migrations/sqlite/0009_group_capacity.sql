-- 0009: what a group's controller knows of its capacity, for the start-time estimate of a queued job
-- (scaleq.server.estimates): the group's slots per worker, the typical boot of its workers as observed (seconds from
-- asking the provider to the worker's registration; NULL: never seen) and when each worker still starting was asked
-- for (a JSON list of epoch seconds). Rows written before it: 1 slot, boot unknown, none starting.
ALTER TABLE groups ADD COLUMN slots INTEGER NOT NULL DEFAULT 1;
ALTER TABLE groups ADD COLUMN boot_seconds REAL;
ALTER TABLE groups ADD COLUMN starting TEXT NOT NULL DEFAULT '[]';

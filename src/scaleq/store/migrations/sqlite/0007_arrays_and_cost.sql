-- 0007: arrays (one submit-many = one array) and what compute cost.
-- An array's jobs carry its id and their index; its progress is one grouped count over jobs_array (partial: only
-- array members are in it, so jobs submitted alone cost it nothing).
CREATE TABLE arrays (
    id          TEXT PRIMARY KEY,
    queue       TEXT NOT NULL,
    name        TEXT,
    size        INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX arrays_created ON arrays (created_at);
ALTER TABLE jobs ADD COLUMN array_id TEXT;
ALTER TABLE jobs ADD COLUMN array_index INTEGER;
CREATE INDEX jobs_array ON jobs (array_id, state, reason) WHERE array_id IS NOT NULL;
-- An attempt's share of its worker (the larger of one slot and the job's cpus over the worker's, at most all of
-- it) and the worker's group, fixed at the claim: the worker may be forgotten before the cost is asked for.
ALTER TABLE attempts ADD COLUMN grp TEXT;
ALTER TABLE attempts ADD COLUMN share REAL;
UPDATE attempts SET
    grp = (SELECT w.grp FROM workers w WHERE w.id = attempts.worker_id),
    share = (SELECT CASE WHEN j.cpus >= w.cpus THEN 1.0 WHEN j.cpus * w.slots > w.cpus THEN j.cpus / w.cpus
                         ELSE 1.0 / w.slots END
               FROM workers w, jobs j WHERE w.id = attempts.worker_id AND j.id = attempts.job_id);
-- A group's price per worker-hour, from the grid file (recorded with the group's status by its controller).
ALTER TABLE groups ADD COLUMN price_per_hour REAL;
-- The ledger of worker lives: one row per registration, extended to its last heartbeat by housekeeping (and by
-- every cost query), kept when the worker itself is forgotten. Worker-seconds per group and queue are its sums.
CREATE TABLE worker_usage (
    worker_id   TEXT NOT NULL,
    started_at  REAL NOT NULL,
    grp         TEXT,
    queue       TEXT NOT NULL,
    last_seen   REAL NOT NULL,
    PRIMARY KEY (worker_id, started_at)
);
INSERT INTO worker_usage (worker_id, started_at, grp, queue, last_seen)
SELECT id, started_at, grp, queue, last_heartbeat FROM workers;

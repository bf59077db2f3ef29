-- Named queries for the SQLite store. Each block starts with "-- name: NAME"; parameters are :named.
-- The claim is one UPDATE … WHERE id IN (SELECT … LIMIT :n) RETURNING: a batch in one statement, and SQLite's
-- single writer makes it atomic without row locks.

-- name: schema
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    definition       TEXT NOT NULL,
    runtime          TEXT NOT NULL,
    cpus             REAL NOT NULL,
    memory           INTEGER,
    gpus             INTEGER NOT NULL,
    tags             TEXT NOT NULL,
    host_network     INTEGER NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    seq              INTEGER NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    exit_code        INTEGER,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    attempt_seq      INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    lease            TEXT UNIQUE,
    lease_expires_at REAL,
    submitted_at     REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id, state);
CREATE INDEX IF NOT EXISTS jobs_lease_expiry ON jobs (state, lease_expires_at);
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    lease       TEXT NOT NULL UNIQUE,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    outcome     TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts (worker_id, ended_at);
CREATE TABLE IF NOT EXISTS logs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    data     BLOB NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, attempt, seq);
CREATE TABLE IF NOT EXISTS blobs (
    sha256  TEXT PRIMARY KEY,
    data    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS workers (
    id             TEXT PRIMARY KEY,
    queue          TEXT NOT NULL,
    grp            TEXT,
    slots          INTEGER NOT NULL,
    state          TEXT NOT NULL,
    runtimes       TEXT NOT NULL,
    cpus           REAL NOT NULL,
    memory         INTEGER,
    gpus           INTEGER NOT NULL,
    tags           TEXT NOT NULL,
    host_network   INTEGER NOT NULL,
    hostname       TEXT NOT NULL,
    started_at     REAL NOT NULL,
    last_heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    grp         TEXT NOT NULL,
    kind        TEXT NOT NULL,
    from_count  INTEGER,
    to_count    INTEGER,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_grp ON events (grp, id);
CREATE TABLE IF NOT EXISTS groups (
    name        TEXT PRIMARY KEY,
    queue       TEXT NOT NULL,
    provider    TEXT NOT NULL,
    min_workers INTEGER NOT NULL,
    max_workers INTEGER NOT NULL,
    current     INTEGER NOT NULL,
    desired     INTEGER NOT NULL,
    updated_at  REAL NOT NULL,
    note        TEXT NOT NULL DEFAULT '',
    checks      TEXT NOT NULL DEFAULT '[]',
    reporter    TEXT NOT NULL DEFAULT 'controller'
);

-- name: migrate_2
-- Version 2: the group status says what the controller wants said (note), its signal checks, and who wrote it.
ALTER TABLE groups ADD COLUMN note TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN checks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE groups ADD COLUMN reporter TEXT NOT NULL DEFAULT 'controller';

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: find_jobs_by_prefix
SELECT * FROM jobs WHERE id >= :prefix AND id < :prefix || 'g' LIMIT 2;

-- name: next_seq
SELECT coalesce(max(seq), 0) + 1 AS seq FROM jobs;

-- name: insert_job
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, submitted_at)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, :tags, :host_network, :priority, :seq, 'queued',
        :max_attempts, :now)
ON CONFLICT (id) DO NOTHING;

-- name: requeue_finished
UPDATE jobs SET state = 'queued', reason = NULL, exit_code = NULL, error = NULL, attempts = 0, worker_id = NULL,
       started_at = NULL, finished_at = NULL, seq = :seq, priority = :priority, max_attempts = :max_attempts
 WHERE id = :id AND state = 'finished';

-- name: list_jobs
SELECT * FROM jobs
 WHERE (:queue IS NULL OR queue = :queue) AND (:state IS NULL OR state = :state)
   AND (:reason IS NULL OR reason = :reason)
 ORDER BY seq DESC LIMIT :limit;

-- name: claim
UPDATE jobs
   SET state = 'running', attempts = attempts + 1, attempt_seq = attempt_seq + 1, worker_id = :worker_id,
       lease = lower(hex(randomblob(16))), lease_expires_at = :expires, started_at = :now
 WHERE id IN (
       SELECT j.id FROM jobs j
        WHERE j.queue = :queue AND j.state = 'queued'
          AND j.runtime IN (SELECT value FROM json_each(:runtimes))
          AND j.cpus <= :cpus AND j.gpus <= :gpus
          AND (j.memory IS NULL OR :memory IS NULL OR j.memory <= :memory)
          AND (j.host_network = 0 OR :host_network = 1)
          AND NOT EXISTS (SELECT 1 FROM json_each(j.tags) t
                           WHERE t.value NOT IN (SELECT value FROM json_each(:tags)))
        ORDER BY j.priority DESC, j.seq
        LIMIT :n)
RETURNING *;

-- name: insert_attempt
INSERT INTO attempts (job_id, attempt, worker_id, lease, started_at) VALUES (:job_id, :attempt, :worker_id, :lease, :now);

-- name: finish
UPDATE jobs SET state = 'finished', reason = :reason, exit_code = :exit_code, error = :error, finished_at = :now,
       lease = NULL, lease_expires_at = NULL
 WHERE lease = :lease AND state = 'running'
RETURNING *;

-- name: end_attempt
UPDATE attempts SET ended_at = :now, outcome = :outcome WHERE lease = :lease AND ended_at IS NULL;

-- name: get_attempt
SELECT * FROM attempts WHERE lease = :lease;

-- name: list_attempts
SELECT * FROM attempts WHERE job_id = :job_id ORDER BY attempt;

-- name: release
UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), worker_id = NULL, lease = NULL,
       lease_expires_at = NULL, started_at = NULL
 WHERE lease = :lease AND state = 'running'
RETURNING *;

-- name: cancel_job
UPDATE jobs SET state = 'finished', reason = 'cancelled', error = :error, finished_at = :now, lease = NULL,
       lease_expires_at = NULL
 WHERE id = :id AND state != 'finished'
RETURNING *;

-- name: end_attempts_of_job
UPDATE attempts SET ended_at = :now, outcome = :outcome WHERE job_id = :job_id AND ended_at IS NULL;

-- name: renew_leases
-- Only the leases the worker says it holds (:held, a JSON array; NULL: all of its leases, as older workers ask): a
-- lease it never learnt of (a claim whose answer was lost) then expires and its job goes back to the queue.
UPDATE jobs SET lease_expires_at = :expires
 WHERE worker_id = :worker_id AND state = 'running'
   AND (:held IS NULL OR lease IN (SELECT value FROM json_each(:held)))
RETURNING lease;

-- name: touch_worker
UPDATE workers SET last_heartbeat = :now, state = CASE WHEN state = 'gone' THEN 'active' ELSE state END
 WHERE id = :id
RETURNING state;

-- name: expire_leases
UPDATE jobs
   SET state = CASE WHEN attempts >= max_attempts THEN 'finished' ELSE 'queued' END,
       reason = CASE WHEN attempts >= max_attempts THEN 'worker_lost' ELSE NULL END,
       error = CASE WHEN attempts >= max_attempts
                    THEN 'lease lost ' || attempts || ' times; last worker ' || coalesce(worker_id, '?') ELSE error END,
       finished_at = CASE WHEN attempts >= max_attempts THEN :now ELSE NULL END,
       worker_id = CASE WHEN attempts >= max_attempts THEN worker_id ELSE NULL END,
       lease = NULL, lease_expires_at = NULL
 WHERE state = 'running' AND lease_expires_at < :now
RETURNING id, queue, state;

-- name: end_lost_attempts
UPDATE attempts SET ended_at = :now, outcome = 'lost'
 WHERE ended_at IS NULL AND lease NOT IN (SELECT lease FROM jobs WHERE lease IS NOT NULL);

-- name: extend_leases
UPDATE jobs SET lease_expires_at = max(lease_expires_at, :expires) WHERE state = 'running';

-- name: append_log
INSERT INTO logs (job_id, attempt, stream, data, at) VALUES (:job_id, :attempt, :stream, :data, :now);

-- name: read_logs
SELECT seq, attempt, stream, data, at FROM logs
 WHERE job_id = :job_id AND attempt = :attempt AND seq > :after
 ORDER BY seq LIMIT :limit;

-- name: put_blob
INSERT INTO blobs (sha256, data) VALUES (:sha256, :data) ON CONFLICT (sha256) DO NOTHING;

-- name: get_blob
SELECT data FROM blobs WHERE sha256 = :sha256;

-- name: has_blob
SELECT 1 FROM blobs WHERE sha256 = :sha256;

-- name: clear_outputs
DELETE FROM outputs WHERE job_id = :job_id;

-- name: put_output
INSERT INTO outputs (job_id, attempt, path, sha256, size) VALUES (:job_id, :attempt, :path, :sha256, :size)
ON CONFLICT (job_id, path) DO UPDATE SET attempt = excluded.attempt, sha256 = excluded.sha256, size = excluded.size;

-- name: list_outputs
SELECT path, sha256, size FROM outputs WHERE job_id = :job_id ORDER BY path;

-- name: queue_stats
SELECT queue,
       sum(state = 'queued') AS queued,
       sum(state = 'running') AS running,
       sum(state = 'finished') AS finished,
       sum(state = 'finished' AND reason = 'success') AS succeeded,
       sum(state = 'finished' AND reason != 'success') AS unsuccessful,
       min(CASE WHEN state = 'queued' THEN submitted_at END) AS oldest_queued_at
  FROM jobs GROUP BY queue ORDER BY queue;

-- name: upsert_worker
INSERT INTO workers (id, queue, grp, slots, state, runtimes, cpus, memory, gpus, tags, host_network, hostname,
                     started_at, last_heartbeat)
VALUES (:id, :queue, :grp, :slots, 'active', :runtimes, :cpus, :memory, :gpus, :tags, :host_network, :hostname,
        :now, :now)
ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, grp = excluded.grp, slots = excluded.slots,
       state = 'active', runtimes = excluded.runtimes, cpus = excluded.cpus, memory = excluded.memory,
       gpus = excluded.gpus, tags = excluded.tags, host_network = excluded.host_network,
       hostname = excluded.hostname, last_heartbeat = excluded.last_heartbeat;

-- name: get_worker
SELECT * FROM workers WHERE id = :id;

-- name: list_workers
SELECT w.*,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running') AS busy,
       max(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE (:queue IS NULL OR w.queue = :queue) AND (:include_gone OR w.state != 'gone')
 ORDER BY w.started_at;

-- name: set_worker_state
UPDATE workers SET state = :state WHERE id = :id;

-- name: mark_gone_workers
UPDATE workers SET state = 'gone' WHERE state != 'gone' AND last_heartbeat < :cutoff RETURNING id;

-- name: forget_workers
DELETE FROM workers WHERE state = 'gone' AND last_heartbeat < :cutoff;

-- name: insert_token
INSERT INTO tokens (id, name, role, hash, created_at) VALUES (:id, :name, :role, :hash, :now);

-- name: find_token
SELECT * FROM tokens WHERE hash = :hash AND revoked_at IS NULL;

-- name: list_tokens
SELECT id, name, role, created_at, revoked_at FROM tokens ORDER BY created_at;

-- name: revoke_token
UPDATE tokens SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL RETURNING id;

-- name: insert_event
INSERT INTO events (at, grp, kind, from_count, to_count, reason) VALUES (:at, :grp, :kind, :from_count, :to_count, :reason);

-- name: list_events
SELECT * FROM events WHERE (:grp IS NULL OR grp = :grp) AND id > :after ORDER BY id DESC LIMIT :limit;

-- name: upsert_group
INSERT INTO groups (name, queue, provider, min_workers, max_workers, current, desired, updated_at, note, checks,
                    reporter)
VALUES (:name, :queue, :provider, :min_workers, :max_workers, :current, :desired, :now, :note, :checks, :reporter)
ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, provider = excluded.provider,
       min_workers = excluded.min_workers, max_workers = excluded.max_workers, current = excluded.current,
       desired = excluded.desired, updated_at = excluded.updated_at, note = excluded.note, checks = excluded.checks,
       reporter = excluded.reporter;

-- name: list_groups
SELECT * FROM groups ORDER BY name;

-- name: delete_group
DELETE FROM groups WHERE name = :name;

-- name: demand
-- Queued jobs are counted up to :limit only (NULL: all): past the most a group can run at once, more changes no
-- decision, and counting a long queue whole on every wake-up of the controller costs O(queue).
SELECT (SELECT count(*) FROM (SELECT 1 FROM jobs j WHERE j.queue = :queue AND j.state = 'queued'
   AND j.runtime IN (SELECT value FROM json_each(:runtimes))
   AND j.cpus <= :cpus AND j.gpus <= :gpus
   AND (j.memory IS NULL OR :memory IS NULL OR j.memory <= :memory)
   AND (j.host_network = 0 OR :host_network = 1)
   AND NOT EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.value NOT IN (SELECT value FROM json_each(:tags)))
         LIMIT coalesce(:limit, -1))) AS queued,
       (SELECT count(*) FROM jobs j WHERE j.queue = :queue AND j.state = 'running'
   AND j.runtime IN (SELECT value FROM json_each(:runtimes))
   AND j.cpus <= :cpus AND j.gpus <= :gpus
   AND (j.memory IS NULL OR :memory IS NULL OR j.memory <= :memory)
   AND (j.host_network = 0 OR :host_network = 1)
   AND NOT EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.value NOT IN (SELECT value FROM json_each(:tags)))) AS running;

-- name: purge_attempts
-- The purge: finished jobs that ended before :before (of :queue; every queue when NULL) with their attempts, logs
-- and outputs, in one transaction, the jobs last. A job finishing meanwhile ends now, not before :before.
DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue));

-- name: purge_logs
DELETE FROM logs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue));

-- name: purge_outputs
DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue));

-- name: purge_jobs
DELETE FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue);

-- name: purge_events
DELETE FROM events WHERE at < :before;

-- name: purge_candidates
-- The blobs the jobs about to be purged refer to (inputs and outputs): the only ones purge_blobs may remove, so that
-- bytes just uploaded for a new submit are not taken (unless a purged job had the very same bytes).
SELECT sha256 FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue))
UNION
SELECT json_extract(i.value, '$.sha256') AS sha256 FROM jobs j, json_each(j.definition, '$.inputs') i WHERE j.id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (:queue IS NULL OR queue = :queue));

-- name: purge_blobs
-- Of the candidates, the blobs no remaining job refers to.
DELETE FROM blobs
 WHERE sha256 IN (SELECT value FROM json_each(:candidates))
   AND sha256 NOT IN (SELECT sha256 FROM outputs)
   AND sha256 NOT IN (SELECT json_extract(i.value, '$.sha256') AS sha256 FROM jobs j, json_each(j.definition, '$.inputs') i);

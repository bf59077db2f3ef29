-- Named queries for the PostgreSQL store: the same names as sqlite.sql. Parameters are written :named (the loader
-- turns them into psycopg's %(named)s). The claim is one UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED
-- LIMIT :n) RETURNING: a batch in one statement; concurrent claimers skip each other's rows instead of waiting.

-- name: schema
CREATE TABLE IF NOT EXISTS scaleq_schema (version INTEGER NOT NULL);
CREATE SEQUENCE IF NOT EXISTS job_seq;
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    definition       TEXT NOT NULL,
    runtime          TEXT NOT NULL,
    cpus             DOUBLE PRECISION NOT NULL,
    memory           BIGINT,
    gpus             INTEGER NOT NULL,
    tags             JSONB NOT NULL,
    host_network     INTEGER NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    seq              BIGINT NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    exit_code        INTEGER,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    attempt_seq      INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    lease            TEXT UNIQUE,
    lease_expires_at DOUBLE PRECISION,
    submitted_at     DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queue_state ON jobs (queue, state);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    lease       TEXT NOT NULL UNIQUE,
    started_at  DOUBLE PRECISION NOT NULL,
    ended_at    DOUBLE PRECISION,
    outcome     TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts (worker_id, ended_at);
CREATE INDEX IF NOT EXISTS attempts_open ON attempts (lease) WHERE ended_at IS NULL;
CREATE TABLE IF NOT EXISTS logs (
    seq      BIGSERIAL PRIMARY KEY,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    data     BYTEA NOT NULL,
    at       DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, attempt, seq);
CREATE TABLE IF NOT EXISTS blobs (
    sha256  TEXT PRIMARY KEY,
    data    BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     BIGINT NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS workers (
    id             TEXT PRIMARY KEY,
    queue          TEXT NOT NULL,
    grp            TEXT,
    slots          INTEGER NOT NULL,
    state          TEXT NOT NULL,
    runtimes       JSONB NOT NULL,
    cpus           DOUBLE PRECISION NOT NULL,
    memory         BIGINT,
    gpus           INTEGER NOT NULL,
    tags           JSONB NOT NULL,
    host_network   INTEGER NOT NULL,
    hostname       TEXT NOT NULL,
    started_at     DOUBLE PRECISION NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS events (
    id          BIGSERIAL PRIMARY KEY,
    at          DOUBLE PRECISION NOT NULL,
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
    updated_at  DOUBLE PRECISION NOT NULL,
    note        TEXT NOT NULL DEFAULT '',
    checks      TEXT NOT NULL DEFAULT '[]',
    reporter    TEXT NOT NULL DEFAULT 'controller'
);

-- name: schema_version
SELECT max(version) AS version FROM scaleq_schema;

-- name: set_schema_version
INSERT INTO scaleq_schema (version) SELECT :version WHERE NOT EXISTS (SELECT 1 FROM scaleq_schema WHERE version >= :version);

-- name: migrate_2
-- Version 2: the group status says what the controller wants said (note), its signal checks, and who wrote it.
ALTER TABLE groups ADD COLUMN IF NOT EXISTS note TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN IF NOT EXISTS checks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE groups ADD COLUMN IF NOT EXISTS reporter TEXT NOT NULL DEFAULT 'controller';

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: find_jobs_by_prefix
SELECT * FROM jobs WHERE starts_with(id, :prefix) LIMIT 2;

-- name: next_seq
SELECT nextval('job_seq') AS seq;

-- name: insert_job
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, submitted_at)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :priority, :seq, 'queued',
        :max_attempts, :now)
ON CONFLICT (id) DO NOTHING;

-- name: insert_new_job
-- A submit in one statement (no transaction around next_seq, insert and read back): the new job, or no row when it
-- already exists (then the store takes the general path, which handles rerun).
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, submitted_at)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :priority,
        nextval('job_seq'), 'queued', :max_attempts, :now)
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: requeue_finished
UPDATE jobs SET state = 'queued', reason = NULL, exit_code = NULL, error = NULL, attempts = 0, worker_id = NULL,
       started_at = NULL, finished_at = NULL, seq = :seq, priority = :priority, max_attempts = :max_attempts
 WHERE id = :id AND state = 'finished';

-- name: list_jobs
SELECT * FROM jobs
 WHERE (CAST(:queue AS TEXT) IS NULL OR queue = :queue) AND (CAST(:state AS TEXT) IS NULL OR state = :state)
   AND (CAST(:reason AS TEXT) IS NULL OR reason = :reason)
 ORDER BY seq DESC LIMIT :limit;

-- name: claim
UPDATE jobs
   SET state = 'running', attempts = attempts + 1, attempt_seq = attempt_seq + 1, worker_id = :worker_id,
       lease = replace(gen_random_uuid()::text, '-', ''), lease_expires_at = :expires, started_at = :now
 WHERE id IN (
       SELECT j.id FROM jobs j
        WHERE j.queue = :queue AND j.state = 'queued'
          AND coalesce(CAST(:runtimes AS JSONB) ? j.runtime
                       AND j.cpus <= :cpus AND j.gpus <= :gpus
                       AND (j.memory IS NULL OR CAST(:memory AS BIGINT) IS NULL OR j.memory <= :memory)
                       AND (j.host_network = 0 OR :host_network = 1)
                       AND j.tags <@ CAST(:tags AS JSONB), false)  -- one condition estimated at 1/2: see worker_claim
        ORDER BY j.priority DESC, j.seq
        LIMIT :n
        FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: claim_plan
-- The claim must walk jobs_claim in order and stop after n rows, however many jobs are queued. Left to itself the
-- planner may prefer to read the whole queue and sort it when it believes few rows match: before the first ANALYZE
-- of a grown table, or in a plan prepared while the table was small (psycopg prepares a statement run often), which
-- is then kept; a claim then costs O(queue) (60 ms at 100,000 queued). With these off, the ordered index scan is the
-- plan at any size. worker_claim runs on connections that have them set (PostgresStore's hot-path pool); claim sets
-- them for its transaction with this.
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true),
       set_config('enable_sort', 'off', true);

-- name: worker_claim
-- The worker protocol claim in one statement (one round trip, one commit): finish what rides along (the arrays, as in
-- finish_batch), read the worker and, if it is active, claim up to n jobs it can run and open their attempts. Rows:
-- one per finished job (finished_lease set), and one per claimed job, or one with NULL job columns when nothing was
-- claimed (finished_lease NULL, worker_queue and worker_state set); none of the latter for an unknown worker.
WITH v AS (
       SELECT * FROM unnest(CAST(:leases AS TEXT[]), CAST(:reasons AS TEXT[]), CAST(:exit_codes AS INTEGER[]),
                            CAST(:errors AS TEXT[])) AS v(lease, reason, exit_code, error)),
done AS (
       UPDATE jobs j
          SET state = 'finished', reason = v.reason, exit_code = v.exit_code, error = v.error, finished_at = :now,
              lease = NULL, lease_expires_at = NULL
         FROM v
        WHERE j.lease = v.lease AND j.state = 'running'
       RETURNING v.lease AS finished_lease, j.*),
ended AS (
       UPDATE attempts a SET ended_at = :now, outcome = done.reason
         FROM done
        WHERE a.lease = done.finished_lease AND a.ended_at IS NULL),
w AS (SELECT * FROM workers WHERE id = :worker_id),
-- The claim must walk jobs_claim in order and stop after n rows, however long the queue. So: the worker's fields
-- are scalar subqueries (evaluated once), not a join (a join would sort the whole queue); and the capability test is
-- one COALESCE, which the planner estimates at 1/2, not a chain of conditions on values it cannot know when
-- planning (estimated at a few rows, which makes a sequential scan and a sort of the whole queue look cheaper).
picked AS (
       SELECT j.id FROM jobs j
        WHERE j.queue = (SELECT queue FROM w WHERE state = 'active') AND j.state = 'queued'
          AND coalesce((SELECT runtimes FROM w) ? j.runtime
                       AND j.cpus <= (SELECT cpus FROM w) AND j.gpus <= (SELECT gpus FROM w)
                       AND (j.memory IS NULL OR (SELECT memory FROM w) IS NULL OR j.memory <= (SELECT memory FROM w))
                       AND (j.host_network = 0 OR (SELECT host_network FROM w) = 1)
                       AND j.tags <@ (SELECT tags FROM w), false)
        ORDER BY j.priority DESC, j.seq
        LIMIT :n
        FOR UPDATE SKIP LOCKED),
claimed AS (
       UPDATE jobs
          SET state = 'running', attempts = attempts + 1, attempt_seq = attempt_seq + 1, worker_id = :worker_id,
              lease = replace(gen_random_uuid()::text, '-', ''), lease_expires_at = :expires, started_at = :now
        WHERE id IN (SELECT id FROM picked)
       RETURNING *),
opened AS (
       INSERT INTO attempts (job_id, attempt, worker_id, lease, started_at)
       SELECT id, attempt_seq, :worker_id, lease, :now FROM claimed)
SELECT w.queue AS worker_queue, w.state AS worker_state, NULL AS finished_lease, c.*
  FROM w LEFT JOIN claimed c ON true
UNION ALL
SELECT NULL, NULL, done.* FROM done;

-- name: finish_batch
-- Several finishes in one statement: the jobs whose leases still own them are finished and their attempts ended;
-- the rows are those jobs, each with the lease that finished it (finished_lease).
WITH v AS (
       SELECT * FROM unnest(CAST(:leases AS TEXT[]), CAST(:reasons AS TEXT[]), CAST(:exit_codes AS INTEGER[]),
                            CAST(:errors AS TEXT[])) AS v(lease, reason, exit_code, error)),
done AS (
       UPDATE jobs j
          SET state = 'finished', reason = v.reason, exit_code = v.exit_code, error = v.error, finished_at = :now,
              lease = NULL, lease_expires_at = NULL
         FROM v
        WHERE j.lease = v.lease AND j.state = 'running'
       RETURNING v.lease AS finished_lease, j.*),
ended AS (
       UPDATE attempts a SET ended_at = :now, outcome = done.reason
         FROM done
        WHERE a.lease = done.finished_lease AND a.ended_at IS NULL)
SELECT * FROM done;

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
UPDATE jobs SET state = 'queued', attempts = greatest(attempts - 1, 0), worker_id = NULL, lease = NULL,
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
   AND (CAST(:held AS JSONB) IS NULL OR CAST(:held AS JSONB) ? lease)
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
UPDATE jobs SET lease_expires_at = greatest(lease_expires_at, :expires) WHERE state = 'running';

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
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state = 'finished') AS finished,
       count(*) FILTER (WHERE state = 'finished' AND reason = 'success') AS succeeded,
       count(*) FILTER (WHERE state = 'finished' AND reason != 'success') AS unsuccessful,
       min(CASE WHEN state = 'queued' THEN submitted_at END) AS oldest_queued_at
  FROM jobs GROUP BY queue ORDER BY queue;

-- name: upsert_worker
INSERT INTO workers (id, queue, grp, slots, state, runtimes, cpus, memory, gpus, tags, host_network, hostname,
                     started_at, last_heartbeat)
VALUES (:id, :queue, :grp, :slots, 'active', CAST(:runtimes AS JSONB), :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :hostname,
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
       greatest(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE (CAST(:queue AS TEXT) IS NULL OR w.queue = :queue) AND (CAST(:include_gone AS BOOLEAN) OR w.state != 'gone')
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
SELECT * FROM events WHERE (CAST(:grp AS TEXT) IS NULL OR grp = :grp) AND id > :after ORDER BY id DESC LIMIT :limit;

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
-- Queued jobs are counted up to :limit only (NULL: all): see the SQLite query.
SELECT (SELECT count(*) FROM (SELECT 1 FROM jobs j WHERE j.queue = :queue AND j.state = 'queued'
   AND CAST(:runtimes AS JSONB) ? j.runtime
   AND j.cpus <= :cpus AND j.gpus <= :gpus
   AND (j.memory IS NULL OR CAST(:memory AS BIGINT) IS NULL OR j.memory <= :memory)
   AND (j.host_network = 0 OR :host_network = 1)
   AND j.tags <@ CAST(:tags AS JSONB)
         LIMIT CAST(:limit AS BIGINT)) q) AS queued,
       (SELECT count(*) FROM jobs j WHERE j.queue = :queue AND j.state = 'running'
   AND CAST(:runtimes AS JSONB) ? j.runtime
   AND j.cpus <= :cpus AND j.gpus <= :gpus
   AND (j.memory IS NULL OR CAST(:memory AS BIGINT) IS NULL OR j.memory <= :memory)
   AND (j.host_network = 0 OR :host_network = 1)
   AND j.tags <@ CAST(:tags AS JSONB)) AS running;

-- name: purge_attempts
-- The purge: finished jobs that ended before :before (of :queue; every queue when NULL) with their attempts, logs
-- and outputs, in one transaction, the jobs last. A job finishing meanwhile ends now, not before :before.
DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue));

-- name: purge_logs
DELETE FROM logs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue));

-- name: purge_outputs
DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue));

-- name: purge_jobs
DELETE FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue);

-- name: purge_events
DELETE FROM events WHERE at < :before;

-- name: purge_candidates
-- The blobs the jobs about to be purged refer to (inputs and outputs): the only ones purge_blobs may remove, so that
-- bytes just uploaded for a new submit are not taken (unless a purged job had the very same bytes).
SELECT sha256 FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue))
UNION
SELECT i ->> 'sha256' AS sha256 FROM jobs j, jsonb_array_elements(CAST(j.definition AS JSONB) -> 'inputs') i WHERE j.id IN (SELECT id FROM jobs WHERE state = 'finished' AND finished_at < :before AND (CAST(:queue AS TEXT) IS NULL OR queue = :queue));

-- name: purge_blobs
-- Of the candidates, the blobs no remaining job refers to.
DELETE FROM blobs
 WHERE CAST(:candidates AS JSONB) ? sha256
   AND sha256 NOT IN (SELECT sha256 FROM outputs)
   AND sha256 NOT IN (SELECT i ->> 'sha256' AS sha256 FROM jobs j, jsonb_array_elements(CAST(j.definition AS JSONB) -> 'inputs') i);

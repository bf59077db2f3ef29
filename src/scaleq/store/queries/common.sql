-- Named queries written once for both dialects (loaded with queries/sqlite.sql or queries/postgres.sql, which hold
-- only what differs; a name defined here and in a dialect file is an error). Each block starts with
-- "-- name: NAME"; parameters are :named. Only SQL both SQLite and PostgreSQL read the same way belongs here.

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: requeue_finished
UPDATE jobs SET state = 'queued', reason = NULL, exit_code = NULL, error = NULL, attempts = 0, failures = 0,
       worker_id = NULL, started_at = NULL, finished_at = NULL, seq = :seq, priority = :priority,
       max_attempts = :max_attempts, retries = :retries, retry_on_exit_codes = :retry_on_exit_codes
 WHERE id = :id AND state = 'finished';

-- name: list_jobs
-- A page of jobs, newest first, below seq :before (the first page: the largest seq there can be). One query per
-- filter, each a plain condition on the columns of its index (jobs_seq, jobs_queue_seq, jobs_state_seq), so a page
-- is a seek and a walk of :limit entries, the same at the millionth job as at the first (an "IS NULL OR" filter
-- would leave the planner no seek); reason and a second filter are checked on the rows the walk reads.
SELECT * FROM jobs WHERE seq < :before
   AND (CAST(:reason AS TEXT) IS NULL OR reason = :reason)
 ORDER BY seq DESC LIMIT :limit;

-- name: list_jobs_of_queue
SELECT * FROM jobs WHERE queue = :queue AND seq < :before
   AND (CAST(:state AS TEXT) IS NULL OR state = :state) AND (CAST(:reason AS TEXT) IS NULL OR reason = :reason)
 ORDER BY seq DESC LIMIT :limit;

-- name: list_jobs_in_state
SELECT * FROM jobs WHERE state = :state AND seq < :before
   AND (CAST(:reason AS TEXT) IS NULL OR reason = :reason)
 ORDER BY seq DESC LIMIT :limit;

-- name: queued_ahead
-- Queued jobs of the job's queue that are claimed before it (higher priority, or the same and older: the claim's
-- order), for its start-time estimate; jobs_claim (queue, state, priority, seq) serves it.
SELECT count(*) AS n FROM jobs AS o, jobs AS j
 WHERE j.id = :id AND o.queue = j.queue AND o.state = 'queued'
   AND (o.priority > j.priority OR (o.priority = j.priority AND o.seq < j.seq));

-- name: running_of_queue
SELECT worker_id, started_at FROM jobs WHERE queue = :queue AND state = 'running' LIMIT :limit;

-- name: recent_run_times
-- The latest successful runs of a queue, by submission (jobs_stats serves it without a sort).
SELECT finished_at - started_at AS seconds FROM jobs
 WHERE queue = :queue AND state = 'finished' AND reason = 'success' AND started_at IS NOT NULL
 ORDER BY submitted_at DESC LIMIT :limit;

-- name: insert_attempt
-- With the worker's group and the attempt's share of the worker (see cost_of_job), fixed now: the worker may be
-- forgotten before the cost is asked for.
INSERT INTO attempts (job_id, attempt, worker_id, lease, started_at, grp, share)
SELECT :job_id, :attempt, :worker_id, :lease, :now, w.grp,
       CASE WHEN j.cpus >= w.cpus THEN 1.0 WHEN j.cpus * w.slots > w.cpus THEN j.cpus / w.cpus ELSE 1.0 / w.slots END
  FROM workers w, jobs j WHERE w.id = :worker_id AND j.id = :job_id;

-- name: end_attempt
UPDATE attempts SET ended_at = :now, outcome = :outcome WHERE lease = :lease AND ended_at IS NULL;

-- name: get_attempt
SELECT * FROM attempts WHERE lease = :lease;

-- name: list_attempts
SELECT * FROM attempts WHERE job_id = :job_id ORDER BY attempt;

-- name: cancel_job
UPDATE jobs SET state = 'finished', reason = 'cancelled', error = :error, finished_at = :now, lease = NULL,
       lease_expires_at = NULL
 WHERE id = :id AND state != 'finished'
RETURNING *;

-- name: end_attempts_of_job
UPDATE attempts SET ended_at = :now, outcome = :outcome WHERE job_id = :job_id AND ended_at IS NULL;

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

-- name: end_worker_attempts
-- A worker's running attempts ended with :outcome (preempted: its provider says so), before release_worker_jobs
-- forgets their leases; both in one transaction.
UPDATE attempts SET ended_at = :now, outcome = :outcome
 WHERE worker_id = :worker_id AND ended_at IS NULL
   AND lease IN (SELECT lease FROM jobs WHERE worker_id = :worker_id AND state = 'running' AND lease IS NOT NULL);

-- name: release_worker_jobs
-- A worker's running jobs back to their queues, at their places, without spending an attempt (as release does).
UPDATE jobs SET state = 'queued', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, worker_id = NULL,
       lease = NULL, lease_expires_at = NULL, started_at = NULL
 WHERE worker_id = :worker_id AND state = 'running'
RETURNING id, queue, state;

-- name: end_lost_attempts
UPDATE attempts SET ended_at = :now, outcome = 'lost'
 WHERE ended_at IS NULL AND lease NOT IN (SELECT lease FROM jobs WHERE lease IS NOT NULL);

-- name: append_log
INSERT INTO logs (job_id, attempt, stream, data, at) VALUES (:job_id, :attempt, :stream, :data, :now);

-- name: read_logs
SELECT seq, attempt, stream, data, at FROM logs
 WHERE job_id = :job_id AND attempt = :attempt AND seq > :after
 ORDER BY seq LIMIT :limit;

-- name: put_blob
-- A blob's row (its bytes go to blob_parts): the row back when it is new, none when the bytes were there already.
INSERT INTO blobs (sha256, data, size, parts) VALUES (:sha256, :empty, :size, :parts)
    ON CONFLICT (sha256) DO NOTHING RETURNING sha256;

-- name: put_blob_part
INSERT INTO blob_parts (sha256, part, data) VALUES (:sha256, :part, :data) ON CONFLICT (sha256, part) DO NOTHING;

-- name: blob_info
SELECT size, parts FROM blobs WHERE sha256 = :sha256;

-- name: get_blob_part
SELECT data FROM blob_parts WHERE sha256 = :sha256 AND part = :part;

-- name: log_counts
SELECT log_bytes, log_dropped FROM attempts WHERE job_id = :job_id AND attempt = :attempt;

-- name: count_logs
UPDATE attempts SET log_bytes = log_bytes + :kept, log_dropped = log_dropped + :dropped
 WHERE job_id = :job_id AND attempt = :attempt;

-- name: has_blob
SELECT 1 FROM blobs WHERE sha256 = :sha256;

-- name: clear_outputs
DELETE FROM outputs WHERE job_id = :job_id;

-- name: put_output
INSERT INTO outputs (job_id, attempt, path, sha256, size) VALUES (:job_id, :attempt, :path, :sha256, :size)
ON CONFLICT (job_id, path) DO UPDATE SET attempt = excluded.attempt, sha256 = excluded.sha256, size = excluded.size;

-- name: list_outputs
SELECT path, sha256, size FROM outputs WHERE job_id = :job_id ORDER BY path;

-- name: get_worker
SELECT * FROM workers WHERE id = :id;

-- name: set_worker_state
UPDATE workers SET state = :state WHERE id = :id;

-- name: mark_gone_workers
UPDATE workers SET state = 'gone' WHERE state != 'gone' AND last_heartbeat < :cutoff RETURNING id;

-- name: forget_workers
DELETE FROM workers WHERE state = 'gone' AND last_heartbeat < :cutoff;

-- name: forget_worker_tokens
DELETE FROM worker_tokens WHERE worker_id NOT IN (SELECT id FROM workers);

-- name: bind_worker
-- A worker id belongs to the token that registered it; it passes to another token only once the worker is gone
-- (or forgotten). A row comes back when the id is (now) bound to :token_id.
INSERT INTO worker_tokens (worker_id, token_id) VALUES (:worker_id, :token_id)
ON CONFLICT (worker_id) DO UPDATE SET token_id = EXCLUDED.token_id
 WHERE worker_tokens.token_id = EXCLUDED.token_id
    OR NOT EXISTS (SELECT 1 FROM workers WHERE id = :worker_id AND state != 'gone')
RETURNING token_id;

-- name: worker_token
SELECT token_id FROM worker_tokens WHERE worker_id = :worker_id;

-- name: lease_token
-- The worker an attempt's lease was handed to, and the token that worker is bound to (NULL: none).
SELECT a.worker_id, w.token_id FROM attempts a LEFT JOIN worker_tokens w ON w.worker_id = a.worker_id
 WHERE a.lease = :lease;

-- name: insert_token
INSERT INTO tokens (id, name, role, hash, created_at) VALUES (:id, :name, :role, :hash, :now);

-- name: find_token
SELECT * FROM tokens WHERE hash = :hash AND revoked_at IS NULL;

-- name: list_tokens
SELECT id, name, role, created_at, revoked_at FROM tokens ORDER BY created_at;

-- name: revoke_token
-- Never the last live admin token: nobody could make tokens any more.
UPDATE tokens SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL
   AND (role != 'admin' OR (SELECT COUNT(*) FROM tokens WHERE role = 'admin' AND revoked_at IS NULL) > 1)
RETURNING id;

-- name: insert_event
INSERT INTO events (at, grp, kind, from_count, to_count, reason) VALUES (:at, :grp, :kind, :from_count, :to_count, :reason);

-- name: list_events
SELECT * FROM events WHERE (CAST(:grp AS TEXT) IS NULL OR grp = :grp) AND id > :after ORDER BY id DESC LIMIT :limit;

-- name: upsert_group
INSERT INTO groups (name, queue, provider, min_workers, max_workers, current, desired, updated_at, note, checks,
                    reporter, state, message, state_since, price_per_hour, slots, boot_seconds, starting)
VALUES (:name, :queue, :provider, :min_workers, :max_workers, :current, :desired, :now, :note, :checks, :reporter,
        :state, :message, :state_since, :price_per_hour, :slots, :boot_seconds, :starting)
ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, provider = excluded.provider,
       min_workers = excluded.min_workers, max_workers = excluded.max_workers, current = excluded.current,
       desired = excluded.desired, updated_at = excluded.updated_at, note = excluded.note, checks = excluded.checks,
       reporter = excluded.reporter, state = excluded.state, message = excluded.message,
       state_since = excluded.state_since, price_per_hour = excluded.price_per_hour, slots = excluded.slots,
       boot_seconds = excluded.boot_seconds, starting = excluded.starting;

-- name: list_groups
SELECT * FROM groups ORDER BY name;

-- name: delete_group
DELETE FROM groups WHERE name = :name;

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

-- name: insert_array
-- The same array again (the same lines on the same queue) is found, not made twice: its first name stays.
INSERT INTO arrays (id, queue, name, size, created_at) VALUES (:id, :queue, :name, :size, :now)
ON CONFLICT (id) DO NOTHING;

-- name: get_array
SELECT * FROM arrays WHERE id = :id;

-- name: list_arrays
SELECT * FROM arrays WHERE (CAST(:queue AS TEXT) IS NULL OR queue = :queue) ORDER BY created_at DESC, id LIMIT :limit;

-- name: array_counts
-- An array's progress: one grouped count from jobs_array (no row is visited), whatever the array's size.
SELECT state, reason, count(*) AS n FROM jobs WHERE array_id = :id GROUP BY state, reason;

-- name: arrays_counts
-- The progress of the arrays list_arrays returns, in one grouped count.
SELECT array_id, state, reason, count(*) AS n FROM jobs
 WHERE array_id IN (SELECT id FROM arrays WHERE (CAST(:queue AS TEXT) IS NULL OR queue = :queue)
                     ORDER BY created_at DESC, id LIMIT :limit)
 GROUP BY array_id, state, reason;

-- name: cancel_array
UPDATE jobs SET state = 'finished', reason = 'cancelled', error = :error, finished_at = :now, lease = NULL,
       lease_expires_at = NULL
 WHERE array_id = :id AND state != 'finished'
RETURNING id, queue;

-- name: end_attempts_of_array
UPDATE attempts SET ended_at = :now, outcome = 'cancelled'
 WHERE ended_at IS NULL AND job_id IN (SELECT id FROM jobs WHERE array_id = :id AND state = 'finished');

-- name: clear_outputs_of_array
-- Before a rerun of the array's finished jobs (all, or with :failed_only those that did not succeed).
DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE array_id = :id AND state = 'finished'
                                        AND (:failed_only = 0 OR reason != 'success'));

-- name: account_usage
-- Extend the ledger of worker lives to each worker's last heartbeat (a new registration starts a row).
INSERT INTO worker_usage (worker_id, started_at, grp, queue, last_seen)
SELECT id, started_at, grp, queue, last_heartbeat FROM workers WHERE true
ON CONFLICT (worker_id, started_at) DO UPDATE SET grp = excluded.grp, queue = excluded.queue,
       last_seen = excluded.last_seen;

-- name: cost_by_group
-- Worker-seconds since :since: each life from the later of its start and :since to its last heartbeat.
SELECT grp AS key, grp,
       sum(CASE WHEN last_seen > (CASE WHEN started_at > :since THEN started_at ELSE :since END)
                THEN last_seen - (CASE WHEN started_at > :since THEN started_at ELSE :since END) ELSE 0 END) AS seconds
  FROM worker_usage GROUP BY grp ORDER BY grp;

-- name: cost_by_queue
SELECT queue AS key, grp,
       sum(CASE WHEN last_seen > (CASE WHEN started_at > :since THEN started_at ELSE :since END)
                THEN last_seen - (CASE WHEN started_at > :since THEN started_at ELSE :since END) ELSE 0 END) AS seconds
  FROM worker_usage GROUP BY queue, grp ORDER BY queue, grp;

-- name: cost_by_array
-- A job's worker-seconds: per attempt, its run time since :since (a running one up to :now) times its share of
-- the worker (1 for attempts from before shares were recorded without a known worker).
SELECT j.array_id AS key, a.grp,
       sum(coalesce(a.share, 1.0) *
           CASE WHEN coalesce(a.ended_at, :now) > (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                THEN coalesce(a.ended_at, :now) - (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                ELSE 0 END) AS seconds
  FROM attempts a JOIN jobs j ON j.id = a.job_id
 WHERE j.array_id IS NOT NULL
 GROUP BY j.array_id, a.grp ORDER BY j.array_id, a.grp;

-- name: cost_of_array
SELECT j.array_id AS key, a.grp,
       sum(coalesce(a.share, 1.0) *
           CASE WHEN coalesce(a.ended_at, :now) > (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                THEN coalesce(a.ended_at, :now) - (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                ELSE 0 END) AS seconds
  FROM attempts a JOIN jobs j ON j.id = a.job_id
 WHERE j.array_id = :id
 GROUP BY j.array_id, a.grp ORDER BY a.grp;

-- name: cost_of_job
SELECT a.job_id AS key, a.grp,
       sum(coalesce(a.share, 1.0) *
           CASE WHEN coalesce(a.ended_at, :now) > (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                THEN coalesce(a.ended_at, :now) - (CASE WHEN a.started_at > :since THEN a.started_at ELSE :since END)
                ELSE 0 END) AS seconds
  FROM attempts a
 WHERE a.job_id = :id
 GROUP BY a.job_id, a.grp ORDER BY a.grp;

-- name: queue_position
-- Where a queued job stands in its queue, as the claim orders it (priority, then submit order): the jobs claimed
-- before it (ahead), of those the ones at a higher priority, and all queued on the queue. It counts over the queue's
-- claim order (jobs_claim: the queued jobs alone), so its cost grows with the jobs ahead.
SELECT CAST(coalesce(sum(CASE WHEN j.priority > me.priority OR (j.priority = me.priority AND j.seq < me.seq)
                              THEN 1 ELSE 0 END), 0) AS BIGINT) AS ahead,
       CAST(coalesce(sum(CASE WHEN j.priority > me.priority THEN 1 ELSE 0 END), 0) AS BIGINT) AS higher,
       CAST(count(j.id) AS BIGINT) AS queued
  FROM jobs me JOIN jobs j ON j.queue = me.queue AND j.state = 'queued'
 WHERE me.id = :id;

-- name: has_queued
-- Whether a queue has a job waiting (jobs_claim's first column pair): a woken claim that found nothing passes its
-- wake on only then.
SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = :queue AND state = 'queued') AS found;

-- name: busy_workers
-- The workers running a job now, for the heartbeat cadence (scaleq.server.cadence): read over the running jobs
-- (jobs_lease_expiry's state column), once per housekeeping round.
SELECT count(DISTINCT worker_id) AS n FROM jobs WHERE state = 'running';

-- name: worker_tallies
-- What /metrics reports of the fleet, counted here (a few rows, however large the fleet): the live workers by queue
-- and state, their slots running a job, and the free slots of the active ones.
SELECT w.queue, w.state, count(*) AS workers, coalesce(sum(b.n), 0) AS busy,
       coalesce(sum(CASE WHEN w.state = 'active' AND w.slots > coalesce(b.n, 0) THEN w.slots - coalesce(b.n, 0)
                         ELSE 0 END), 0) AS idle
  FROM workers w
  LEFT JOIN (SELECT worker_id, count(*) AS n FROM jobs WHERE state = 'running' GROUP BY worker_id) b
         ON b.worker_id = w.id
 WHERE w.state != 'gone'
 GROUP BY w.queue, w.state
 ORDER BY w.queue, w.state;

-- Named queries of the PostgreSQL store that differ from SQLite's (those written once are in common.sql; a name may
-- be in only one of the two). Parameters are written :named (the loader turns them into psycopg's %(named)s).
-- The claim is one UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT :n) RETURNING: a batch in one
-- statement; concurrent claimers skip each other's rows instead of waiting.

-- name: schema_lock
-- One migrator at a time across servers (held to the end of the transaction; the key is scaleq's).
SELECT pg_advisory_xact_lock(727274);

-- name: schema_table
SELECT to_regclass('scaleq_schema') IS NOT NULL AS present;

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM scaleq_schema;

-- name: record_version
INSERT INTO scaleq_schema (version) VALUES (:version);

-- name: find_jobs_by_prefix
SELECT * FROM jobs WHERE starts_with(id, :prefix) LIMIT 2;

-- name: find_arrays_by_prefix
SELECT * FROM arrays WHERE starts_with(id, :prefix) LIMIT 2;

-- name: rerun_array
-- Queue the array's finished jobs again (all, or with :failed_only those that did not succeed), behind what is
-- queued, in the array's order (seq drawn by index).
UPDATE jobs SET state = 'queued', reason = NULL, exit_code = NULL, error = NULL, attempts = 0, worker_id = NULL,
       started_at = NULL, finished_at = NULL, seq = n.seq
  FROM (SELECT o.id, nextval('job_seq') AS seq
          FROM (SELECT id FROM jobs WHERE array_id = :id AND state = 'finished'
                   AND (:failed_only = 0 OR reason != 'success') ORDER BY array_index) o) n
 WHERE jobs.id = n.id
RETURNING jobs.id, jobs.queue;

-- name: next_seq
SELECT nextval('job_seq') AS seq;

-- name: insert_job
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, retries, retry_on_exit_codes, submitted_at, array_id, array_index)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :priority, :seq, 'queued',
        :max_attempts, :retries, :retry_on_exit_codes, :now, :array_id, :array_index)
ON CONFLICT (id) DO NOTHING;

-- name: insert_new_job
-- A submit in one statement (no transaction around next_seq, insert and read back): the new job, or no row when it
-- already exists (then the store takes the general path, which handles rerun).
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, retries, retry_on_exit_codes, submitted_at, array_id, array_index)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :priority,
        nextval('job_seq'), 'queued', :max_attempts, :retries, :retry_on_exit_codes, :now, :array_id, :array_index)
ON CONFLICT (id) DO NOTHING
RETURNING *;

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
-- A program failure of a kind the job retries, with retries left, goes back to the queue (as SQLite's finish).
r AS (
       SELECT v.*, coalesce(v.reason IN ('failed', 'timed_out') AND j.failures < j.retries
                            AND (j.retry_on_exit_codes IS NULL
                                 OR (v.reason = 'failed'
                                     AND CAST(j.retry_on_exit_codes AS JSONB) @> to_jsonb(v.exit_code))),
                            false) AS retry
         FROM v JOIN jobs j ON j.lease = v.lease AND j.state = 'running'),
done AS (
       UPDATE jobs j
          SET state = CASE WHEN r.retry THEN 'queued' ELSE 'finished' END,
              reason = CASE WHEN r.retry THEN NULL ELSE r.reason END,
              exit_code = r.exit_code, error = r.error,
              finished_at = CASE WHEN r.retry THEN NULL ELSE :now END,
              attempts = CASE WHEN r.retry THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
              failures = j.failures + CASE WHEN r.retry THEN 1 ELSE 0 END,
              worker_id = CASE WHEN r.retry THEN NULL ELSE j.worker_id END,
              started_at = CASE WHEN r.retry THEN NULL ELSE j.started_at END,
              lease = NULL, lease_expires_at = NULL
         FROM r
        WHERE j.lease = r.lease AND j.state = 'running'
       RETURNING r.lease AS finished_lease, r.reason AS finished_reason, j.*),
ended AS (
       UPDATE attempts a SET ended_at = :now, outcome = done.finished_reason
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
       INSERT INTO attempts (job_id, attempt, worker_id, lease, started_at, grp, share)
       SELECT id, attempt_seq, :worker_id, lease, :now, (SELECT grp FROM w),
              CASE WHEN cpus >= (SELECT cpus FROM w) THEN 1.0
                   WHEN cpus * (SELECT slots FROM w) > (SELECT cpus FROM w) THEN cpus / (SELECT cpus FROM w)
                   ELSE 1.0 / (SELECT slots FROM w) END  -- the attempt's share of the worker: see insert_attempt
         FROM claimed)
SELECT w.queue AS worker_queue, w.state AS worker_state, NULL AS finished_lease, NULL AS finished_reason, c.*
  FROM w LEFT JOIN claimed c ON true
UNION ALL
SELECT NULL, NULL, done.* FROM done;

-- name: finish_batch
-- Several finishes in one statement: the jobs whose leases still own them are finished and their attempts ended;
-- the rows are those jobs, each with the lease that finished it (finished_lease).
WITH v AS (
       SELECT * FROM unnest(CAST(:leases AS TEXT[]), CAST(:reasons AS TEXT[]), CAST(:exit_codes AS INTEGER[]),
                            CAST(:errors AS TEXT[])) AS v(lease, reason, exit_code, error)),
-- A program failure of a kind the job retries, with retries left, goes back to the queue (as SQLite's finish).
r AS (
       SELECT v.*, coalesce(v.reason IN ('failed', 'timed_out') AND j.failures < j.retries
                            AND (j.retry_on_exit_codes IS NULL
                                 OR (v.reason = 'failed'
                                     AND CAST(j.retry_on_exit_codes AS JSONB) @> to_jsonb(v.exit_code))),
                            false) AS retry
         FROM v JOIN jobs j ON j.lease = v.lease AND j.state = 'running'),
done AS (
       UPDATE jobs j
          SET state = CASE WHEN r.retry THEN 'queued' ELSE 'finished' END,
              reason = CASE WHEN r.retry THEN NULL ELSE r.reason END,
              exit_code = r.exit_code, error = r.error,
              finished_at = CASE WHEN r.retry THEN NULL ELSE :now END,
              attempts = CASE WHEN r.retry THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
              failures = j.failures + CASE WHEN r.retry THEN 1 ELSE 0 END,
              worker_id = CASE WHEN r.retry THEN NULL ELSE j.worker_id END,
              started_at = CASE WHEN r.retry THEN NULL ELSE j.started_at END,
              lease = NULL, lease_expires_at = NULL
         FROM r
        WHERE j.lease = r.lease AND j.state = 'running'
       RETURNING r.lease AS finished_lease, r.reason AS finished_reason, j.*),
ended AS (
       UPDATE attempts a SET ended_at = :now, outcome = done.finished_reason
         FROM done
        WHERE a.lease = done.finished_lease AND a.ended_at IS NULL)
SELECT * FROM done;

-- name: release
UPDATE jobs SET state = 'queued', attempts = greatest(attempts - 1, 0), worker_id = NULL, lease = NULL,
       lease_expires_at = NULL, started_at = NULL
 WHERE lease = :lease AND state = 'running'
RETURNING *;

-- name: renew_leases
-- Only the leases the worker says it holds (:held, a JSON array; NULL: all of its leases, as older workers ask): a
-- lease it never learnt of (a claim whose answer was lost) then expires and its job goes back to the queue.
UPDATE jobs SET lease_expires_at = :expires
 WHERE worker_id = :worker_id AND state = 'running'
   AND (CAST(:held AS JSONB) IS NULL OR CAST(:held AS JSONB) ? lease)
RETURNING lease;

-- name: worker_heartbeats
-- Many workers' heartbeats in one statement and one round trip (store/heartbeats.py: on a thread of the store's pool
-- each round trip waits for the interpreter's lock, which a busy event loop hands over every few milliseconds). For
-- each: the worker marked heard from (and active again if it was marked gone), the running leases it says it holds
-- (held: a JSON array; NULL: all of them) renewed to its own expiry. A worker appears once in the arrays. Rows: one per renewed lease, or one with
-- a NULL lease for a worker that renewed none; state NULL for an unknown worker (whose leases are not renewed).
WITH v AS (
       SELECT * FROM unnest(CAST(:worker_ids AS TEXT[]), CAST(:nows AS DOUBLE PRECISION[]),
                            CAST(:expires AS DOUBLE PRECISION[]), CAST(:helds AS TEXT[]))
                AS v(worker_id, now, expires, held)),
w AS (
       UPDATE workers SET last_heartbeat = v.now,
              state = CASE WHEN workers.state = 'gone' THEN 'active' ELSE workers.state END
         FROM v
        WHERE workers.id = v.worker_id
       RETURNING workers.id, workers.state),
renewed AS (
       UPDATE jobs j SET lease_expires_at = v.expires
         FROM v JOIN w ON w.id = v.worker_id
        WHERE j.worker_id = v.worker_id AND j.state = 'running'
          AND (v.held IS NULL OR CAST(v.held AS JSONB) ? j.lease)
       RETURNING j.worker_id, j.lease)
SELECT v.worker_id, w.state, renewed.lease
  FROM v LEFT JOIN w ON w.id = v.worker_id LEFT JOIN renewed ON renewed.worker_id = v.worker_id;

-- name: extend_leases
-- The start-up grace: a fresh lease period for the running jobs of workers not marked gone, once per lease until
-- its worker is heard from again (a heartbeat, or the claim itself): restarting servers cannot keep a dead worker's
-- job, whose lease ends at the latest one lease period after the first server start since its worker's last word.
UPDATE jobs SET lease_expires_at = greatest(lease_expires_at, :expires), lease_graced_at = :now
 WHERE state = 'running'
   AND EXISTS (SELECT 1 FROM workers w
                WHERE w.id = jobs.worker_id AND w.state != 'gone'
                  AND (jobs.lease_graced_at IS NULL OR jobs.lease_graced_at < greatest(jobs.started_at, w.last_heartbeat)));

-- name: upsert_worker
INSERT INTO workers (id, queue, grp, slots, state, runtimes, cpus, memory, gpus, tags, host_network, hostname,
                     started_at, last_heartbeat)
VALUES (:id, :queue, :grp, :slots, 'active', CAST(:runtimes AS JSONB), :cpus, :memory, :gpus, CAST(:tags AS JSONB), :host_network, :hostname,
        :now, :now)
ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, grp = excluded.grp, slots = excluded.slots,
       state = 'active', runtimes = excluded.runtimes, cpus = excluded.cpus, memory = excluded.memory,
       gpus = excluded.gpus, tags = excluded.tags, host_network = excluded.host_network,
       hostname = excluded.hostname, last_heartbeat = excluded.last_heartbeat;

-- name: list_workers
SELECT w.*,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running') AS busy,
       greatest(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE (CAST(:queue AS TEXT) IS NULL OR w.queue = :queue) AND (CAST(:include_gone AS BOOLEAN) OR w.state != 'gone')
 ORDER BY w.started_at;

-- name: one_worker
-- One worker as list_workers shows it, by its primary key (GET /workers/{id}, deregister): O(1), not O(fleet).
SELECT w.*,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running') AS busy,
       greatest(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE w.id = :id;

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

-- name: purge_blob_parts
-- The parts of the candidates purge_blobs removed.
DELETE FROM blob_parts
 WHERE CAST(:candidates AS JSONB) ? sha256
   AND sha256 NOT IN (SELECT sha256 FROM blobs);

-- name: holds_input
-- Whether a running job of a worker bound to :token_id has the blob :sha256 among its inputs.
SELECT 1 AS held FROM jobs j JOIN worker_tokens w ON w.worker_id = j.worker_id
 WHERE w.token_id = :token_id AND j.state = 'running'
   AND EXISTS (SELECT 1 FROM jsonb_array_elements(CAST(j.definition AS JSONB) -> 'inputs') i
               WHERE i ->> 'sha256' = :sha256)
 LIMIT 1;

-- name: touch_workers
-- The workers whose claims are parked on a server, heard from now (:ids, a JSON array): one statement per tick for the
-- whole fleet. A gone worker is left gone (it deregistered, or was given up on before its claim ended). Answers those
-- of them not active: drained or marked gone where this server did not hear of it (another server's notice missed
-- while its listener was down; another server's round marking it gone), or forgotten; the server answers their claims.
-- The final SELECT sees the rows as they were before the UPDATE, which does not change a state.
-- A row another write holds (the worker's drain, its heartbeat's batch: writes of milliseconds that change its state
-- or refresh its last heartbeat) is skipped, not waited for: the next tick touches it again (ticks are seconds apart;
-- gone takes 45 s). Waiting, the touch held thousands of rows' locks while it queued behind one, and drains and
-- heartbeat batches queued behind it (docs/benchmarks.md, "The touch that answers missed drains, and its lock
-- convoy").
WITH ids AS (SELECT jsonb_array_elements_text(CAST(:ids AS JSONB)) AS id),
touched AS (
  UPDATE workers SET last_heartbeat = :now
   WHERE id IN (SELECT w.id FROM workers w
                 WHERE w.id IN (SELECT id FROM ids) AND w.state != 'gone' AND w.last_heartbeat < :now
                 FOR NO KEY UPDATE SKIP LOCKED))
SELECT ids.id FROM ids LEFT JOIN workers w ON w.id = ids.id
 WHERE w.state IS DISTINCT FROM 'active';

-- name: queue_stats
-- queue_counts plus the deltas not yet folded into it (migration 0011), so exact between folds; one snapshot sees a
-- fold whole or not at all. The oldest queued job from the jobs_stats index (a queued job's reason is always NULL):
-- written as ORDER BY the index's own columns … LIMIT 1: min(), or ORDER BY submitted_at alone, does not let the planner
-- read the index in order (reason IS NULL is no equality to it), so it scanned and sorted the whole queue once most
-- of the table was one queue's queued jobs (476 ms at 1M, bench/scale.py; its high cost estimate switched JIT on too).
SELECT u.queue, CAST(sum(u.queued) AS BIGINT) AS queued, CAST(sum(u.running) AS BIGINT) AS running,
       CAST(sum(u.finished) AS BIGINT) AS finished, CAST(sum(u.succeeded) AS BIGINT) AS succeeded,
       CAST(sum(u.finished) - sum(u.succeeded) AS BIGINT) AS unsuccessful,
       (SELECT j.submitted_at FROM jobs j
         WHERE j.queue = u.queue AND j.state = 'queued' AND j.reason IS NULL
         ORDER BY j.queue, j.state, j.reason, j.submitted_at LIMIT 1) AS oldest_queued_at
  FROM (SELECT queue, queued, running, finished, succeeded FROM queue_counts
        UNION ALL SELECT queue, queued, running, finished, succeeded FROM queue_count_deltas) AS u
 GROUP BY u.queue
HAVING sum(u.queued) + sum(u.running) + sum(u.finished) > 0
 ORDER BY u.queue;

-- name: fold_queue_counts
-- The deltas the statement triggers appended, summed into queue_counts and deleted, in one statement; how many were
-- folded. Rows a transaction still open appended are not visible yet and wait for the next fold; two servers folding
-- at once do not count a delta twice (the second's DELETE skips the rows the first deleted).
WITH d AS (DELETE FROM queue_count_deltas RETURNING queue, queued, running, finished, succeeded),
folded AS (
    INSERT INTO queue_counts AS c (queue, queued, running, finished, succeeded)
    SELECT queue, sum(queued), sum(running), sum(finished), sum(succeeded) FROM d GROUP BY queue
    ON CONFLICT (queue) DO UPDATE SET queued = c.queued + excluded.queued, running = c.running + excluded.running,
                                      finished = c.finished + excluded.finished,
                                      succeeded = c.succeeded + excluded.succeeded)
SELECT count(*) AS n FROM d;

-- name: vacuum_queue_count_deltas
-- After large folds: the deleted deltas stay in the table as dead rows until a vacuum, and queue_stats reads the
-- whole table (900,000 dead rows after a bulk load: 13-40 ms per GET /queues, 0.1 ms once vacuumed). Autovacuum
-- gets there within its naptime (a minute); this does it at once. SKIP_LOCKED (PostgreSQL 12+): a vacuum already
-- running (another server's, autovacuum's) is left to do it. Its truncation holds the table's lock for a moment only
-- when it gets it at once (a trigger appending a delta meanwhile waits that moment). Outside a transaction (the
-- pool's connections autocommit).
VACUUM (SKIP_LOCKED) queue_count_deltas;

-- name: worker_offers
-- Who could take a queue's jobs (a submit's warning, a job's estimate): its active workers in classes alike in group,
-- slots and capabilities, each with its workers' ids — a few rows for a fleet of thousands of the same machine.
SELECT grp, slots, runtimes, cpus, memory, gpus, tags, host_network, json_agg(id ORDER BY started_at, id) AS ids, min(started_at) AS since
  FROM workers WHERE queue = :queue AND state = 'active'
 GROUP BY grp, slots, runtimes, cpus, memory, gpus, tags, host_network
 ORDER BY since, min(id);

-- Named queries of the SQLite store that differ from PostgreSQL's (those written once are in common.sql; a name
-- may be in only one of the two). Each block starts with "-- name: NAME"; parameters are :named.
-- The claim is one UPDATE … WHERE id IN (SELECT … LIMIT :n) RETURNING: a batch in one statement, and SQLite's
-- single writer makes it atomic without row locks.

-- name: schema_version
PRAGMA user_version;

-- name: find_jobs_by_prefix
SELECT * FROM jobs WHERE id >= :prefix AND id < :prefix || 'g' LIMIT 2;

-- name: find_arrays_by_prefix
SELECT * FROM arrays WHERE id >= :prefix AND id < :prefix || 'g' LIMIT 2;

-- name: rerun_array
-- Queue the array's finished jobs again (all, or with :failed_only those that did not succeed), behind what is
-- queued, in the array's order: seq from :seq on, by index.
UPDATE jobs SET state = 'queued', reason = NULL, exit_code = NULL, error = NULL, attempts = 0, worker_id = NULL,
       started_at = NULL, finished_at = NULL, seq = :seq + array_index
 WHERE array_id = :id AND state = 'finished' AND (:failed_only = 0 OR reason != 'success')
RETURNING id, queue;

-- name: next_seq
SELECT coalesce(max(seq), 0) + 1 AS seq FROM jobs;

-- name: insert_job
INSERT INTO jobs (id, queue, definition, runtime, cpus, memory, gpus, tags, host_network, priority, seq, state,
                  max_attempts, retries, retry_on_exit_codes, submitted_at, array_id, array_index)
VALUES (:id, :queue, :definition, :runtime, :cpus, :memory, :gpus, :tags, :host_network, :priority, :seq, 'queued',
        :max_attempts, :retries, :retry_on_exit_codes, :now, :array_id, :array_index)
ON CONFLICT (id) DO NOTHING;

-- name: finish
-- One attempt's result, the job's side in one statement (end_attempt follows): the job its lease still owns is finished
-- or — a program failure of a kind the job retries, with retries left — queued again at its place, counted in failures
-- and not in attempts (that budget is the infrastructure's). The row is the job as the result left it; none for a lease
-- that owns nothing. PostgreSQL decides the same for a batch of results in finish_batch and worker_claim. The exit
-- codes are looked up with EXISTS, not IN (SELECT ...): SQLite builds an IN list before the AND around it can skip it,
-- once per reference of the flattened subquery, which made this statement eight times slower than a read and an update
-- (~450 against ~55 us).
UPDATE jobs
   SET state = CASE WHEN r.retry THEN 'queued' ELSE 'finished' END,
       reason = CASE WHEN r.retry THEN NULL ELSE :reason END,
       exit_code = :exit_code, error = :error,
       finished_at = CASE WHEN r.retry THEN NULL ELSE :now END,
       attempts = CASE WHEN r.retry THEN max(jobs.attempts - 1, 0) ELSE jobs.attempts END,
       failures = jobs.failures + r.retry,
       worker_id = CASE WHEN r.retry THEN NULL ELSE jobs.worker_id END,
       started_at = CASE WHEN r.retry THEN NULL ELSE jobs.started_at END,
       lease = NULL, lease_expires_at = NULL
  FROM (SELECT id, coalesce(:reason IN ('failed', 'timed_out') AND failures < retries
                            AND (retry_on_exit_codes IS NULL
                                 OR (:reason = 'failed'
                                     AND EXISTS (SELECT 1 FROM json_each(retry_on_exit_codes)
                                                  WHERE value = :exit_code))),
                            0) AS retry
          FROM jobs WHERE lease = :lease AND state = 'running') AS r
 WHERE jobs.id = r.id
RETURNING *;

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

-- name: release
UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), worker_id = NULL, lease = NULL,
       lease_expires_at = NULL, started_at = NULL
 WHERE lease = :lease AND state = 'running'
RETURNING *;

-- name: renew_leases
-- Only the leases the worker says it holds (:held, a JSON array; NULL: all of its leases, as older workers ask): a
-- lease it never learnt of (a claim whose answer was lost) then expires and its job goes back to the queue.
UPDATE jobs SET lease_expires_at = :expires
 WHERE worker_id = :worker_id AND state = 'running'
   AND (:held IS NULL OR lease IN (SELECT value FROM json_each(:held)))
RETURNING lease;

-- name: extend_leases
-- The start-up grace: a fresh lease period for the running jobs of workers not marked gone, once per lease until
-- its worker is heard from again (a heartbeat, or the claim itself): restarting servers cannot keep a dead worker's
-- job, whose lease ends at the latest one lease period after the first server start since its worker's last word.
UPDATE jobs SET lease_expires_at = max(lease_expires_at, :expires), lease_graced_at = :now
 WHERE state = 'running'
   AND EXISTS (SELECT 1 FROM workers w
                WHERE w.id = jobs.worker_id AND w.state != 'gone'
                  AND (jobs.lease_graced_at IS NULL OR jobs.lease_graced_at < max(jobs.started_at, w.last_heartbeat)));

-- name: upsert_worker
INSERT INTO workers (id, queue, grp, slots, state, runtimes, cpus, memory, gpus, tags, host_network, hostname,
                     started_at, last_heartbeat)
VALUES (:id, :queue, :grp, :slots, 'active', :runtimes, :cpus, :memory, :gpus, :tags, :host_network, :hostname,
        :now, :now)
ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, grp = excluded.grp, slots = excluded.slots,
       state = 'active', runtimes = excluded.runtimes, cpus = excluded.cpus, memory = excluded.memory,
       gpus = excluded.gpus, tags = excluded.tags, host_network = excluded.host_network,
       hostname = excluded.hostname, last_heartbeat = excluded.last_heartbeat;

-- name: list_workers
SELECT w.*,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running') AS busy,
       max(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE (:queue IS NULL OR w.queue = :queue) AND (:include_gone OR w.state != 'gone')
 ORDER BY w.started_at;

-- name: one_worker
-- One worker as list_workers shows it, by its primary key (GET /workers/{id}, deregister): O(1), not O(fleet).
SELECT w.*,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = 'running') AS busy,
       max(w.started_at, coalesce((SELECT max(a.ended_at) FROM attempts a WHERE a.worker_id = w.id), 0))
           AS last_active
  FROM workers w
 WHERE w.id = :id;

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

-- name: purge_blob_parts
-- The parts of the candidates purge_blobs removed.
DELETE FROM blob_parts
 WHERE sha256 IN (SELECT value FROM json_each(:candidates))
   AND sha256 NOT IN (SELECT sha256 FROM blobs);

-- name: holds_input
-- Whether a running job of a worker bound to :token_id has the blob :sha256 among its inputs.
SELECT 1 AS held FROM jobs j JOIN worker_tokens w ON w.worker_id = j.worker_id
 WHERE w.token_id = :token_id AND j.state = 'running'
   AND EXISTS (SELECT 1 FROM json_each(j.definition, '$.inputs') i
               WHERE json_extract(i.value, '$.sha256') = :sha256)
 LIMIT 1;

-- name: touch_workers
-- The workers whose claims are parked on a server, heard from now (:ids, a JSON array): one statement per tick for the
-- whole fleet. A gone worker is left gone (it deregistered, or was given up on before its claim ended).
UPDATE workers SET last_heartbeat = :now
 WHERE id IN (SELECT value FROM json_each(:ids)) AND state != 'gone' AND last_heartbeat < :now;

-- name: workers_not_active
-- Of the workers whose claims are parked on a server (:ids, a JSON array), those the store no longer holds active:
-- drained or marked gone where this server did not hear of it, or forgotten; the server answers their claims.
-- Read after touch_workers (SQLite cannot write in a WITH, as PostgreSQL's one statement does).
SELECT i.value AS id FROM json_each(:ids) i LEFT JOIN workers w ON w.id = i.value
 WHERE w.state IS NOT 'active';

-- name: queue_stats
-- One row per queue from queue_counts (kept by migration 0011's triggers), and the oldest queued job from the
-- jobs_stats index (a queued job's reason is always NULL): the same cost at any queue length.
SELECT c.queue, c.queued, c.running, c.finished, c.succeeded, c.finished - c.succeeded AS unsuccessful,
       (SELECT min(j.submitted_at) FROM jobs j
         WHERE j.queue = c.queue AND j.state = 'queued' AND j.reason IS NULL) AS oldest_queued_at
  FROM queue_counts c
 WHERE c.queued + c.running + c.finished > 0
 ORDER BY c.queue;

-- name: worker_offers
-- Who could take a queue's jobs (a submit's warning, a job's estimate): its active workers in classes alike in group,
-- slots and capabilities, each with its workers' ids — a few rows for a fleet of thousands of the same machine.
SELECT grp, slots, runtimes, cpus, memory, gpus, tags, host_network, json_group_array(id) AS ids, min(started_at) AS since
  FROM (SELECT * FROM workers WHERE queue = :queue AND state = 'active' ORDER BY started_at, id)
 GROUP BY grp, slots, runtimes, cpus, memory, gpus, tags, host_network
 ORDER BY since, min(id);

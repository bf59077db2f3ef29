-- 0011: queue counts kept as jobs change, not counted when asked. GET /queues, `scaleq queues`, the /metrics gauges
-- and the controller's queue_length read one row per queue (and the oldest queued job from the jobs_stats index: one
-- seek), so they cost the same at 1,000,000 queued jobs as at 10; counting the index per call grew with the queue.
-- A row trigger updating one counter row per queue would make every claim, finish and submit of a queue wait on that
-- row's lock, one transaction at a time across servers. So a statement trigger appends what each statement changed,
-- summed per queue, to queue_count_deltas (inserts only: nothing waits), and the servers' housekeeping folds the
-- deltas into queue_counts every sweep (queries/postgres.sql fold_queue_counts). queue_stats reads both, so it is
-- exact whether or not a fold has run. unsuccessful is finished - succeeded.
CREATE TABLE queue_counts (
    queue     TEXT PRIMARY KEY,
    queued    BIGINT NOT NULL DEFAULT 0,
    running   BIGINT NOT NULL DEFAULT 0,
    finished  BIGINT NOT NULL DEFAULT 0,
    succeeded BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE queue_count_deltas (
    queue     TEXT NOT NULL,
    queued    BIGINT NOT NULL,
    running   BIGINT NOT NULL,
    finished  BIGINT NOT NULL,
    succeeded BIGINT NOT NULL
);
INSERT INTO queue_counts (queue, queued, running, finished, succeeded)
SELECT queue, count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'),
       count(*) FILTER (WHERE state = 'finished'), count(*) FILTER (WHERE state = 'finished' AND reason = 'success')
  FROM jobs GROUP BY queue;
-- One function for the three triggers: each names only the transition tables its event has (a statement is planned
-- when first run, so the branches of the other events are never planned against tables that are not there).
CREATE FUNCTION scaleq_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_count_deltas (queue, queued, running, finished, succeeded)
        SELECT queue, count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'),
               count(*) FILTER (WHERE state = 'finished'),
               count(*) FILTER (WHERE state = 'finished' AND reason = 'success')
          FROM new_jobs GROUP BY queue;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_count_deltas (queue, queued, running, finished, succeeded)
        SELECT queue, -count(*) FILTER (WHERE state = 'queued'), -count(*) FILTER (WHERE state = 'running'),
               -count(*) FILTER (WHERE state = 'finished'),
               -count(*) FILTER (WHERE state = 'finished' AND reason = 'success')
          FROM old_jobs GROUP BY queue;
    ELSE
        -- Most updates (a lease extended, a log counted) move no count: nothing is written for them.
        INSERT INTO queue_count_deltas (queue, queued, running, finished, succeeded)
        SELECT * FROM (
            SELECT queue, sum(CASE WHEN state = 'queued' THEN s ELSE 0 END) AS queued,
                   sum(CASE WHEN state = 'running' THEN s ELSE 0 END) AS running,
                   sum(CASE WHEN state = 'finished' THEN s ELSE 0 END) AS finished,
                   sum(CASE WHEN state = 'finished' AND reason = 'success' THEN s ELSE 0 END) AS succeeded
              FROM (SELECT queue, state, reason, 1 AS s FROM new_jobs
                    UNION ALL SELECT queue, state, reason, -1 FROM old_jobs) AS moved
             GROUP BY queue) AS net
         WHERE queued <> 0 OR running <> 0 OR finished <> 0 OR succeeded <> 0;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION scaleq_count_jobs();
CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION scaleq_count_jobs();
CREATE TRIGGER jobs_counted_moved AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION scaleq_count_jobs();

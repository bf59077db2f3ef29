-- 0011: queue counts kept as jobs change, not counted when asked. GET /queues, `scaleq queues`, the /metrics gauges
-- and the controller's queue_length read one row per queue from queue_counts (and the oldest queued job from the
-- jobs_stats index: one seek), so they cost the same at 1,000,000 queued jobs as at 10; counting the index per call
-- grew with the queue (55-60 ms at 100,000). SQLite has one writer at a time, so a row trigger per change is exact and
-- costs no contention: every insert, delete and change of queue, state or reason moves the counts in the same
-- transaction. unsuccessful is finished - succeeded.
CREATE TABLE queue_counts (
    queue     TEXT PRIMARY KEY,
    queued    INTEGER NOT NULL DEFAULT 0,
    running   INTEGER NOT NULL DEFAULT 0,
    finished  INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0
);
INSERT INTO queue_counts (queue, queued, running, finished, succeeded)
SELECT queue, sum(state = 'queued'), sum(state = 'running'), sum(state = 'finished'),
       sum(state = 'finished' AND reason IS 'success')
  FROM jobs GROUP BY queue;
CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs BEGIN
    INSERT INTO queue_counts (queue, queued, running, finished, succeeded)
    VALUES (NEW.queue, NEW.state = 'queued', NEW.state = 'running', NEW.state = 'finished',
            NEW.state = 'finished' AND NEW.reason IS 'success')
    ON CONFLICT (queue) DO UPDATE SET queued = queued + excluded.queued, running = running + excluded.running,
                                      finished = finished + excluded.finished,
                                      succeeded = succeeded + excluded.succeeded;
END;
CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs BEGIN
    UPDATE queue_counts
       SET queued = queued - (OLD.state = 'queued'), running = running - (OLD.state = 'running'),
           finished = finished - (OLD.state = 'finished'),
           succeeded = succeeded - (OLD.state = 'finished' AND OLD.reason IS 'success')
     WHERE queue = OLD.queue;
END;
CREATE TRIGGER jobs_counted_moved AFTER UPDATE OF queue, state, reason ON jobs
WHEN OLD.queue IS NOT NEW.queue OR OLD.state IS NOT NEW.state OR OLD.reason IS NOT NEW.reason BEGIN
    UPDATE queue_counts
       SET queued = queued - (OLD.state = 'queued'), running = running - (OLD.state = 'running'),
           finished = finished - (OLD.state = 'finished'),
           succeeded = succeeded - (OLD.state = 'finished' AND OLD.reason IS 'success')
     WHERE queue = OLD.queue;
    INSERT INTO queue_counts (queue, queued, running, finished, succeeded)
    VALUES (NEW.queue, NEW.state = 'queued', NEW.state = 'running', NEW.state = 'finished',
            NEW.state = 'finished' AND NEW.reason IS 'success')
    ON CONFLICT (queue) DO UPDATE SET queued = queued + excluded.queued, running = running + excluded.running,
                                      finished = finished + excluded.finished,
                                      succeeded = succeeded + excluded.succeeded;
END;

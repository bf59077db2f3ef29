-- 0012: the jobs indexes that serve one state hold that state's jobs alone, as PostgreSQL's have from the start:
-- jobs_claim the queued jobs, jobs_lease_expiry and jobs_worker the running ones. A job's write then touches only the
-- indexes of the states it leaves and enters (a submit no longer writes the two indexes of running jobs, a finish no
-- longer moves its job within jobs_claim), and the indexes the claim and the lease sweep walk are the size of the
-- queue and of the running jobs, not of the history. Each keeps its state column, so that SQLite's planner (which
-- keeps no statistics here) weighs it as before: every query keeps its plan or moves to a smaller index; each query
-- that used one names the state it holds.
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs (queue, state, priority DESC, seq) WHERE state = 'queued';
DROP INDEX jobs_lease_expiry;
CREATE INDEX jobs_lease_expiry ON jobs (state, lease_expires_at) WHERE state = 'running';
DROP INDEX jobs_worker;
CREATE INDEX jobs_worker ON jobs (worker_id, state) WHERE state = 'running';

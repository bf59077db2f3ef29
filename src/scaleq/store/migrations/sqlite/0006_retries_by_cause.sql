-- Retries by cause: beside the infrastructure budget (max_attempts, counted in attempts), the program's own budget.
-- retries: how many failed or timed_out attempts are queued again; failures: how many of the current run were;
-- retry_on_exit_codes: a JSON array of the exit codes retried (NULL: every failure and timeout). Existing jobs get
-- 0 retries: the behaviour they were submitted with.
ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_on_exit_codes TEXT;

-- 0004: a placeholder for the retries branch's 0004 (scaleq#13), so that this branch's 0005 follows without a gap.
-- Delete this file when merging that branch.
SELECT 1;

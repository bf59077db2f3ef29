-- 0008: a group's state as its controller last saw it -- ok, or a refusal the provider gave (quota, rate_limited)
-- or another provider or signal error -- with the provider's message and since when, for `scaleq groups`, the
-- dashboard and doctor. Rows written before it are 'ok'.
ALTER TABLE groups ADD COLUMN state TEXT NOT NULL DEFAULT 'ok';
ALTER TABLE groups ADD COLUMN message TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN state_since REAL;

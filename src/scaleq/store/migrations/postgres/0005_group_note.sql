-- The group status says what the controller wants said now (note: capped at max_workers, a signal it fell back
-- from), its checks of the group's signal (served with the server's health checks), and who wrote it (a running
-- controller, apply, or a controller that stopped).
ALTER TABLE groups ADD COLUMN note TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN checks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE groups ADD COLUMN reporter TEXT NOT NULL DEFAULT 'controller';

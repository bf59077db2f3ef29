-- 0010: bounded memory. A blob's bytes move to blob_parts, in parts of at most 1 MiB (scaleq.server.outputs
-- writes and reads them one part at a time, so an upload or a download never holds a whole file); the blobs row
-- keeps the hash, the size and how many parts there are, and an empty data. Blobs stored before are moved as one
-- part each (as big as they were: they were held whole when they were written too).
CREATE TABLE blob_parts (
    sha256  TEXT NOT NULL,
    part    BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    PRIMARY KEY (sha256, part)
);
ALTER TABLE blobs ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN parts BIGINT NOT NULL DEFAULT 0;
INSERT INTO blob_parts (sha256, part, data) SELECT sha256, 0, data FROM blobs WHERE length(data) > 0;
UPDATE blobs SET size = length(data), parts = CASE WHEN length(data) > 0 THEN 1 ELSE 0 END, data = '\x';
-- The per-attempt log cap: what was kept and what was dropped past it, counted as chunks arrive.
ALTER TABLE attempts ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN log_dropped BIGINT NOT NULL DEFAULT 0;
-- GET /jobs pages by seq (newest first, a cursor past the last seq); filtered by queue or state it walks these.
CREATE INDEX jobs_queue_seq ON jobs (queue, seq);
CREATE INDEX jobs_state_seq ON jobs (state, seq);

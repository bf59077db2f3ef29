-- 0001: the schema as scaleq first released it, word for word (hence the IF NOT EXISTS): a database made
-- before numbered migrations, by these same statements, is at this version (table scaleq_schema = 1).
CREATE TABLE IF NOT EXISTS scaleq_schema (version INTEGER NOT NULL);
CREATE SEQUENCE IF NOT EXISTS job_seq;
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    definition       TEXT NOT NULL,
    runtime          TEXT NOT NULL,
    cpus             DOUBLE PRECISION NOT NULL,
    memory           BIGINT,
    gpus             INTEGER NOT NULL,
    tags             JSONB NOT NULL,
    host_network     INTEGER NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    seq              BIGINT NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    exit_code        INTEGER,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    attempt_seq      INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    lease            TEXT UNIQUE,
    lease_expires_at DOUBLE PRECISION,
    submitted_at     DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queue_state ON jobs (queue, state);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    lease       TEXT NOT NULL UNIQUE,
    started_at  DOUBLE PRECISION NOT NULL,
    ended_at    DOUBLE PRECISION,
    outcome     TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts (worker_id, ended_at);
CREATE INDEX IF NOT EXISTS attempts_open ON attempts (lease) WHERE ended_at IS NULL;
CREATE TABLE IF NOT EXISTS logs (
    seq      BIGSERIAL PRIMARY KEY,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    data     BYTEA NOT NULL,
    at       DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, attempt, seq);
CREATE TABLE IF NOT EXISTS blobs (
    sha256  TEXT PRIMARY KEY,
    data    BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     BIGINT NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS workers (
    id             TEXT PRIMARY KEY,
    queue          TEXT NOT NULL,
    grp            TEXT,
    slots          INTEGER NOT NULL,
    state          TEXT NOT NULL,
    runtimes       JSONB NOT NULL,
    cpus           DOUBLE PRECISION NOT NULL,
    memory         BIGINT,
    gpus           INTEGER NOT NULL,
    tags           JSONB NOT NULL,
    host_network   INTEGER NOT NULL,
    hostname       TEXT NOT NULL,
    started_at     DOUBLE PRECISION NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS events (
    id          BIGSERIAL PRIMARY KEY,
    at          DOUBLE PRECISION NOT NULL,
    grp         TEXT NOT NULL,
    kind        TEXT NOT NULL,
    from_count  INTEGER,
    to_count    INTEGER,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_grp ON events (grp, id);
CREATE TABLE IF NOT EXISTS groups (
    name        TEXT PRIMARY KEY,
    queue       TEXT NOT NULL,
    provider    TEXT NOT NULL,
    min_workers INTEGER NOT NULL,
    max_workers INTEGER NOT NULL,
    current     INTEGER NOT NULL,
    desired     INTEGER NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL
);

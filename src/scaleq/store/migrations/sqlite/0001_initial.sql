-- 0001: the schema as scaleq first released it, word for word (hence the IF NOT EXISTS): a database made
-- before numbered migrations, by these same statements, is at this version (PRAGMA user_version = 1).
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    definition       TEXT NOT NULL,
    runtime          TEXT NOT NULL,
    cpus             REAL NOT NULL,
    memory           INTEGER,
    gpus             INTEGER NOT NULL,
    tags             TEXT NOT NULL,
    host_network     INTEGER NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    seq              INTEGER NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    exit_code        INTEGER,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    attempt_seq      INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    lease            TEXT UNIQUE,
    lease_expires_at REAL,
    submitted_at     REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id, state);
CREATE INDEX IF NOT EXISTS jobs_lease_expiry ON jobs (state, lease_expires_at);
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    lease       TEXT NOT NULL UNIQUE,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    outcome     TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts (worker_id, ended_at);
CREATE TABLE IF NOT EXISTS logs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    data     BLOB NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, attempt, seq);
CREATE TABLE IF NOT EXISTS blobs (
    sha256  TEXT PRIMARY KEY,
    data    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS workers (
    id             TEXT PRIMARY KEY,
    queue          TEXT NOT NULL,
    grp            TEXT,
    slots          INTEGER NOT NULL,
    state          TEXT NOT NULL,
    runtimes       TEXT NOT NULL,
    cpus           REAL NOT NULL,
    memory         INTEGER,
    gpus           INTEGER NOT NULL,
    tags           TEXT NOT NULL,
    host_network   INTEGER NOT NULL,
    hostname       TEXT NOT NULL,
    started_at     REAL NOT NULL,
    last_heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
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
    updated_at  REAL NOT NULL
);

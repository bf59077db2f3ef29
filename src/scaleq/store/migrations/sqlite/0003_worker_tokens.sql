-- A worker id belongs to the token that registered it (roles that hold: a worker token acts only on its own
-- workers and their leases). Rows are dropped with the workers they name.
CREATE TABLE worker_tokens (
    worker_id   TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL
);

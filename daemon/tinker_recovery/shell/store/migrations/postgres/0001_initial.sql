-- Initial schema. Records are kept whole as JSON in `data` (text, parsed by the daemon, so rows
-- written by a newer version load unchanged); the other columns exist to be queried on.
-- Tables are created unqualified: they land in the first schema of search_path.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row (id = 1): who leads, until when (database clock), and the fencing epoch.
CREATE TABLE lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE lineages (
    lineage_id TEXT PRIMARY KEY,
    root_run_id TEXT NOT NULL,
    current_run_id TEXT NOT NULL,
    state TEXT NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX lineages_root_run ON lineages (root_run_id);
CREATE INDEX lineages_current_run ON lineages (current_run_id);
CREATE INDEX lineages_state ON lineages (state);

CREATE TABLE attempts (
    attempt_id TEXT PRIMARY KEY,
    lineage_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    corrupted_run_id TEXT NOT NULL,
    successor_run_id TEXT,
    outcome TEXT,
    started_at TIMESTAMPTZ NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX attempts_lineage ON attempts (lineage_id, number);
CREATE INDEX attempts_corrupted_run ON attempts (corrupted_run_id);
CREATE INDEX attempts_successor_run ON attempts (successor_run_id);
CREATE INDEX attempts_unfinished ON attempts (started_at) WHERE outcome IS NULL;

CREATE TABLE events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    lineage_id TEXT,
    attempt_id TEXT,
    run_id TEXT,
    data TEXT NOT NULL
);
CREATE INDEX events_lineage ON events (lineage_id, seq);
CREATE INDEX events_run ON events (run_id, seq);

CREATE TABLE bad_checkpoints (
    tinker_path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL
);

-- scope: a lineage id, or '' for the whole fleet.
CREATE TABLE holds (
    scope TEXT PRIMARY KEY,
    held_by TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL
);

CREATE TABLE manual_requests (
    request_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT NOT NULL,
    checkpoint_path TEXT,
    requested_at TIMESTAMPTZ NOT NULL,
    requested_by TEXT NOT NULL,
    taken_at TIMESTAMPTZ,
    taken_by TEXT
);
CREATE INDEX manual_requests_pending ON manual_requests (request_id) WHERE taken_at IS NULL;

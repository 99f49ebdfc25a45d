-- Initial schema. Times are fixed-width ISO 8601 UTC text, so text order is time order.
-- Records are kept whole as JSON in `data`; the other columns exist to be queried on.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row (id = 1): who leads, until when, and the fencing epoch.
CREATE TABLE lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    epoch INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    renewed_at TEXT NOT NULL
);

CREATE TABLE lineages (
    lineage_id TEXT PRIMARY KEY,
    root_run_id TEXT NOT NULL,
    current_run_id TEXT NOT NULL,
    state TEXT NOT NULL,
    first_seen_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
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
    started_at TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX attempts_lineage ON attempts (lineage_id, number);
CREATE INDEX attempts_corrupted_run ON attempts (corrupted_run_id);
CREATE INDEX attempts_successor_run ON attempts (successor_run_id);
CREATE INDEX attempts_unfinished ON attempts (started_at) WHERE outcome IS NULL;

CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
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
    at TEXT NOT NULL
);

-- scope: a lineage id, or '' for the whole fleet.
CREATE TABLE holds (
    scope TEXT PRIMARY KEY,
    held_by TEXT NOT NULL,
    at TEXT NOT NULL
);

CREATE TABLE manual_requests (
    request_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    checkpoint_path TEXT,
    requested_at TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    taken_at TEXT,
    taken_by TEXT
);
CREATE INDEX manual_requests_pending ON manual_requests (request_id) WHERE taken_at IS NULL;

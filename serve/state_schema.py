"""The tables ``veil serve`` adds to a dataset's privacy database: sessions, owner feedback, idempotent
accepts, released images, and the fingerprints that say which record an upload is (``veil.serve.state``).

Written once, in SQLite's dialect, like the ledger's own schema (``veil.privacy.ledger_schema``); the
server creates them through ``veil.privacy.db`` (``Database.create_tables``), which derives PostgreSQL's
types and takes the schema lock there, so two replicas starting together do not race. Plain text; no imports.
"""

SERVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS serve_sessions (
    token_hash  TEXT PRIMARY KEY,        -- sha256 hex of the session token (the token itself is never stored)
    image_id    TEXT NOT NULL,
    image_png   BLOB NOT NULL,           -- the ORIGINAL image: private
    attributes  TEXT NOT NULL,           -- JSON {name: -1|1|0}: the owner's true values
    guesses     TEXT,                    -- JSON: what the classifier read, if anything
    protected   TEXT NOT NULL,           -- JSON list of attribute names
    level       TEXT NOT NULL,           -- JSON {name, epsilon, strength, encoding}
    decision    TEXT CHECK (decision IN ('accepted', 'refused', 'rejected')),  -- NULL while open
    release_id  INTEGER,                 -- the release an accept made
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS serve_sessions_by_release ON serve_sessions (release_id);
CREATE TABLE IF NOT EXISTS serve_feedback (
    feedback_id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash  TEXT NOT NULL,
    action      TEXT NOT NULL,
    level       TEXT NOT NULL,           -- JSON: the level the owner was shown or chose
    at          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS serve_accepts (
    token_hash  TEXT NOT NULL,
    key         TEXT NOT NULL,           -- the client's idempotency key
    release_id  INTEGER NOT NULL,
    response    TEXT NOT NULL,           -- JSON: what the first request answered, replayed to a retry
    at          TEXT NOT NULL,
    PRIMARY KEY (token_hash, key)
);
CREATE TABLE IF NOT EXISTS serve_release_images (
    release_id  INTEGER PRIMARY KEY,     -- the edited image that was published
    png         BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS serve_fingerprints (
    fingerprint_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- registration order: the oldest match wins
    image_id    TEXT NOT NULL UNIQUE,    -- the record: a --dataset image's id, or the first upload's img-...
    kind        TEXT NOT NULL CHECK (kind IN ('dataset', 'upload')),
    hash        TEXT NOT NULL,           -- veil.privacy.identity fingerprint: a blurred grey thumbnail, private
    at          TEXT NOT NULL
)
"""

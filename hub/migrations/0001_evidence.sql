-- Cases, operations, recordings, the segment chain and the audit log. Plain SQL that
-- SQLite and PostgreSQL both take (the hub runs on either through sqlx's Any driver).

CREATE TABLE cases (
    number TEXT PRIMARY KEY,
    court TEXT NOT NULL,
    parties TEXT NOT NULL,
    state TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    closed_us BIGINT
);

CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    case_number TEXT NOT NULL REFERENCES cases (number),
    name TEXT NOT NULL,
    starts_us BIGINT NOT NULL,
    ends_us BIGINT NOT NULL,
    latitude DOUBLE PRECISION NOT NULL,
    longitude DOUBLE PRECISION NOT NULL,
    radius_m DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    closed_us BIGINT
);

CREATE TABLE operation_units (
    operation_id TEXT NOT NULL REFERENCES operations (id),
    unit TEXT NOT NULL,
    PRIMARY KEY (operation_id, unit)
);

-- One chain per unit: init segments, media segments and gap records, each linked to the
-- one before by its hash and signed by the hub.
CREATE TABLE segments (
    unit TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    recording TEXT NOT NULL,
    number BIGINT NOT NULL,
    path TEXT NOT NULL,
    codecs TEXT NOT NULL,
    start_us BIGINT NOT NULL,
    end_us BIGINT NOT NULL,
    media_start BIGINT NOT NULL,
    media_duration BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    case_number TEXT,
    operation_id TEXT,
    officer TEXT,
    court TEXT NOT NULL,
    recorded_us BIGINT NOT NULL,
    signature TEXT NOT NULL,
    deleted_us BIGINT,
    PRIMARY KEY (unit, seq)
);

CREATE INDEX segments_by_case ON segments (case_number);
CREATE INDEX segments_by_time ON segments (unit, start_us);

-- Append-only, hash-chained, each row signed by the hub.
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    signature TEXT NOT NULL
);

-- Telemetry points (bound to a case while the unit is in an active operation) and the
-- alarms the deviation rules raised, with who acknowledged and resolved them.

CREATE TABLE telemetry (
    unit TEXT NOT NULL,
    at_us BIGINT NOT NULL,
    received_us BIGINT NOT NULL,
    latitude DOUBLE PRECISION,
    longitude DOUBLE PRECISION,
    accuracy_m DOUBLE PRECISION,
    speed_mps DOUBLE PRECISION,
    heading_deg DOUBLE PRECISION,
    battery_percent DOUBLE PRECISION,
    signal_dbm BIGINT NOT NULL,
    storage_free_bytes BIGINT NOT NULL,
    recording BIGINT NOT NULL,
    sos BIGINT NOT NULL,
    case_number TEXT,
    operation_id TEXT
);

CREATE INDEX telemetry_by_unit ON telemetry (unit, at_us);
CREATE INDEX telemetry_by_case ON telemetry (case_number);

CREATE TABLE alarms (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    unit TEXT NOT NULL,
    case_number TEXT,
    operation_id TEXT,
    raised_us BIGINT NOT NULL,
    evidence TEXT NOT NULL,
    state TEXT NOT NULL,
    acked_by TEXT,
    acked_us BIGINT,
    resolved_by TEXT,
    resolved_us BIGINT,
    comment TEXT
);

CREATE INDEX alarms_by_state ON alarms (state, raised_us);

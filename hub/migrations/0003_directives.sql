-- Directives issued here or passed down from a parent hub, with their latest state.
-- Every hub on the path keeps its own row, so the state is visible at every tier.

CREATE TABLE directives (
    id TEXT PRIMARY KEY,
    unit TEXT NOT NULL,
    kind BIGINT NOT NULL,
    text TEXT NOT NULL,
    bitrate BIGINT NOT NULL,
    height BIGINT NOT NULL,
    issued_by TEXT NOT NULL,
    court TEXT NOT NULL,
    issued_us BIGINT NOT NULL,
    state BIGINT NOT NULL,
    reason TEXT NOT NULL,
    updated_us BIGINT NOT NULL,
    -- 1 when the directive came from the parent hub: its states go back up.
    from_parent BIGINT NOT NULL
);

CREATE INDEX directives_by_unit ON directives (unit, issued_us);
CREATE INDEX directives_open ON directives (state);

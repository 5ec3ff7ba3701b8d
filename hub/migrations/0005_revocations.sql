-- Revoked tokens: kind 'jti' (one token) or 'subject' (every token of that unit or user
-- issued up to at_us). Revoking a subject again moves the moment forward.

CREATE TABLE revocations (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (kind, value)
);

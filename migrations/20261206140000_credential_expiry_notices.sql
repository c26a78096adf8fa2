-- Issue #20: each credential.expiring announcement (30 and 7 days ahead), recorded so that it
-- is published once per credential, expiry and threshold, by whichever worker gets there
-- first. `published_at` stays NULL until the broker confirmed the domain event, so a failed
-- publish is retried on the next check.
CREATE TABLE credential_expiry_notices (
    credential     text        NOT NULL,
    expires_at     timestamptz NOT NULL,
    threshold_days integer     NOT NULL,
    event_id       uuid        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    PRIMARY KEY (credential, expires_at, threshold_days)
);

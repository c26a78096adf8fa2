-- Effects decided by the machine, committed with the transition and executed afterwards
-- (at least once; every effect is idempotent). Claimed with FOR UPDATE SKIP LOCKED.
CREATE TABLE outbox (
    id              uuid        PRIMARY KEY,
    subscription_id uuid        NOT NULL,
    -- The event-log row whose decision produced this effect.
    event_id        uuid        NOT NULL,
    kind            text        NOT NULL,
    effect          jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'done', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    correlation_id  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_due_idx ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_subscription_idx ON outbox (subscription_id);

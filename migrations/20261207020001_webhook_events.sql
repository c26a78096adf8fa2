-- Every domain event as the ISV sees it (its CloudEvents JSON), in the order it was
-- published: the pull feed (GET /api/v1/events) reads it by `position`, the webhook
-- deliveries sign its body. Rows are inserted under a transaction-level advisory lock, so
-- positions become visible in order and a cursor never skips a row committed late.
CREATE TABLE webhook_events (
    position        bigserial   PRIMARY KEY,
    -- The CloudEvents id (the event-log id, `:n` when a decision published several).
    id              text        NOT NULL UNIQUE,
    subscription_id uuid        NOT NULL,
    type            text        NOT NULL,
    body            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_events_subscription_idx ON webhook_events (subscription_id, position);

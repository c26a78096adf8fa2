-- The delivery log: one row per attempt to deliver an event to an endpoint (the delivery
-- itself is an `outbox` row of kind `deliver_webhook`).
CREATE TABLE webhook_attempts (
    id              bigserial   PRIMARY KEY,
    endpoint_id     uuid        NOT NULL,
    -- The CloudEvents id (webhook-id); `webhook.test` events have their own.
    event_id        text        NOT NULL,
    outbox_id       uuid,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status; NULL when no answer came (timeout, refused connection).
    status          integer,
    latency_ms      integer     NOT NULL,
    -- The first bytes of the answer, or the transport error.
    response_head   text        NOT NULL DEFAULT '',
    outcome         text        NOT NULL
        CHECK (outcome IN ('delivered', 'failed', 'skipped'))
);

CREATE INDEX webhook_attempts_endpoint_idx ON webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_event_idx ON webhook_attempts (event_id);

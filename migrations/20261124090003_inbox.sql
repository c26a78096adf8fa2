-- Dedupe of inbound messages: a message is applied at most once per (message id, kind),
-- e.g. (webhook operation id, action) or (command id, 'command'). Inserted with
-- ON CONFLICT DO NOTHING in the same transaction that applies the event.
CREATE TABLE inbox (
    message_id      text        NOT NULL,
    kind            text        NOT NULL,
    subscription_id uuid        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, kind)
);

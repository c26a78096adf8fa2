-- Every publisher command accepted (entitlement API or CLI), recorded before it is queued, so
-- its outcome can be asked for from the moment its id is handed out
-- (GET /api/v1/commands/{id}).
CREATE TABLE commands (
    command_id      uuid        PRIMARY KEY,
    subscription_id uuid        NOT NULL,
    kind            text        NOT NULL,
    requested_by    text        NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now()
);

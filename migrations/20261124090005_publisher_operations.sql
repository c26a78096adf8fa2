-- Changes we asked Microsoft for (PATCH plan/quantity, DELETE) and their asynchronous
-- operations, tracked from the command until a final status.
CREATE TABLE publisher_operations (
    command_id         uuid        PRIMARY KEY,
    subscription_id    uuid        NOT NULL,
    kind               text        NOT NULL CHECK (kind IN ('ChangePlan', 'ChangeQuantity', 'Cancel')),
    target_plan_id     text,
    target_quantity    integer,
    operation_id       uuid        UNIQUE,
    operation_location text,
    status             text        NOT NULL DEFAULT 'Requested'
        CHECK (status IN ('Requested', 'Accepted', 'Refused', 'Succeeded', 'Failed', 'Conflict')),
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX publisher_operations_subscription_idx ON publisher_operations (subscription_id);

-- The ISV's webhook endpoints (docs/webhooks.md). The signing secret is kept because signing
-- needs it (Standard Webhooks signs with the shared secret itself); it is shown once, at
-- creation and rotation, and never logged. During a rotation's overlap the previous secret
-- signs too, so the ISV may verify with either.
CREATE TABLE webhook_endpoints (
    id                      uuid        PRIMARY KEY,
    url                     text        NOT NULL,
    description             text        NOT NULL DEFAULT '',
    -- Topic patterns: `*`, `subscription.*`, or an exact routing key.
    topics                  text[]      NOT NULL,
    -- Only events of subscriptions of this offer; NULL: every offer.
    offer_id                text,
    -- Plain HTTP on a non-loopback host was allowed explicitly.
    insecure                boolean     NOT NULL DEFAULT false,
    secret                  text        NOT NULL,
    previous_secret         text,
    previous_secret_until   timestamptz,
    status                  text        NOT NULL DEFAULT 'enabled'
        CHECK (status IN ('enabled', 'disabled')),
    disabled_reason         text,
    -- The first failed attempt since the last success: failing for too long disables.
    failing_since           timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- The RabbitMQ prefixes the processes of this database declared, so that a command given an
-- unknown prefix (a typo in FULFILLMENT__AMQP__PREFIX) can name the ones that exist instead
-- of declaring an empty new topology.
CREATE TABLE amqp_prefixes (
    prefix       text PRIMARY KEY,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    last_process text NOT NULL
);

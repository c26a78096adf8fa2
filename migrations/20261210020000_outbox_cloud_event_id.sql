-- The CloudEvent id of a `publish_domain_event` row, fixed when its decision queues it: the
-- decision's event-log id, or `<event id>:<n>` when the decision publishes several events
-- (n counts them in the decision's order). Before, the runner counted the decision's
-- domain-event rows with one query per published event. NULL for other kinds and for rows
-- queued before this column (and by the notice emitter): the runner counts those as before.
ALTER TABLE outbox ADD COLUMN cloud_event_id text;

-- outbox_event_idx served one query: a domain event's position among its decision's
-- domain events, counted by event_id to make its CloudEvent id. Every row queued today
-- carries that id (cloud_event_id, migration 20261210020000: the decisions' rows and the
-- notice emitter's), so only rows queued before it are counted. Every outbox row was
-- written into the index at least twice (queued, then ended: `status` is indexed
-- elsewhere, so no update of the outbox is HOT) for nothing: 8 entries per customer change
-- in `bench pipeline`. The index now holds the rows the count reads, and no new row.
DROP INDEX outbox_event_idx;
CREATE INDEX outbox_event_idx ON outbox (event_id)
    WHERE kind = 'publish_domain_event' AND cloud_event_id IS NULL;

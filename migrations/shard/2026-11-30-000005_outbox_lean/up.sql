-- The outbox is written once per settled order and read once by the relay, which sends the
-- payload as text: `json` keeps it as written instead of converting it to jsonb and back.
-- Event ids are minted fresh for every event written (UUIDv7), so a unique index on them
-- only cost an index insertion per event; consumers still deduplicate on them.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;

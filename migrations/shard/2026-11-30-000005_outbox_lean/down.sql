ALTER TABLE outbox ALTER COLUMN payload TYPE jsonb USING payload::jsonb;
ALTER TABLE outbox ADD CONSTRAINT outbox_event_id_key UNIQUE (event_id);

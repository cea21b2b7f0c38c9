-- Rows holding several events cannot be split back into one row each: unsent rows keep their
-- first event only.
UPDATE outbox SET payload = payload -> 0, event_type = split_part(event_type, ',', 1)
WHERE sent_at IS NULL AND json_typeof(payload) = 'array';

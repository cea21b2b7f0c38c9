-- One outbox row per order change instead of one per event: a settled order's
-- `order.created` and `order.paid` share a row (one heap tuple and two index entries fewer
-- per order). `payload` is now a JSON array of the change's events, in order, and
-- `event_type` their types joined by commas; `event_id` is the first event's id. Rows not yet
-- sent become one-event arrays so the relay reads a single shape.
UPDATE outbox SET payload = json_build_array(payload)
WHERE sent_at IS NULL AND json_typeof(payload) = 'object';

-- Email -> user id, for login and for email uniqueness across all shards.
CREATE TABLE email_directory (
    email      TEXT PRIMARY KEY,
    user_id    UUID NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

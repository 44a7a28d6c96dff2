-- Schema version 2: idempotent sends. A send may carry a client-chosen id;
-- a resend with the same id gets the original result instead of a second
-- message. Rows older than the retention window are pruned.
CREATE TABLE send_ids (
    sender       TEXT    NOT NULL,
    client_id    BLOB    NOT NULL,
    recipient    TEXT    NOT NULL,
    message_id   INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, client_id)
) WITHOUT ROWID;

CREATE INDEX send_ids_by_time ON send_ids (timestamp_ms);

-- Schema version 3: messages in arrival order. Version 1 clustered messages
-- by (recipient, id), so every batch of messages for different recipients
-- rewrote one table page per recipient (bodies and all) in the log and at
-- checkpoint. Now rows are appended in arrival order (rowid), and only the
-- small (recipient, id) index entries are spread out.
CREATE TABLE messages_v3 (
    recipient    TEXT    NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
    id           INTEGER NOT NULL,
    sender       TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    -- 0: queued for a fetch; 1: pushed or fetched, awaiting an ack.
    delivered    INTEGER NOT NULL DEFAULT 0
);

INSERT INTO messages_v3 (recipient, id, sender, body, timestamp_ms, delivered)
SELECT recipient, id, sender, body, timestamp_ms, delivered
FROM messages
ORDER BY recipient, id;

DROP TABLE messages;

ALTER TABLE messages_v3 RENAME TO messages;

CREATE UNIQUE INDEX messages_by_recipient ON messages (recipient, id);

-- Schema version 6: send ids are bounded per sender as well as in time
-- (chat_core::MAX_SEND_IDS_PER_SENDER): past the bound, a sender's oldest
-- are deleted first, by timestamp and then by arrival. Version 2 clustered
-- send ids by (sender, client_id), which keeps no arrival order; now they
-- are a rowid table (rowids increase with arrival), and the key is a unique
-- index. Existing rows keep their relative order by time.
CREATE TABLE send_ids_v6 (
    sender       TEXT    NOT NULL,
    client_id    BLOB    NOT NULL,
    recipient    TEXT    NOT NULL,
    message_id   INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    -- CRC-32 of the body; NULL for rows from version 2 or 3.
    body_crc     INTEGER
);

INSERT INTO send_ids_v6 (sender, client_id, recipient, message_id, timestamp_ms, body_crc)
SELECT sender, client_id, recipient, message_id, timestamp_ms, body_crc
FROM send_ids
ORDER BY timestamp_ms, sender, client_id;

-- Drops send_ids_by_time with it.
DROP TABLE send_ids;

ALTER TABLE send_ids_v6 RENAME TO send_ids;

-- The resend lookup, the upsert's conflict target, and a sender's count.
CREATE UNIQUE INDEX send_ids_by_key ON send_ids (sender, client_id);

-- The prune by time.
CREATE INDEX send_ids_by_time ON send_ids (timestamp_ms);

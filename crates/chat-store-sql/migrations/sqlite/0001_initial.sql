-- Schema version 1: accounts and their stored messages.
CREATE TABLE accounts (
    name       TEXT    NOT NULL PRIMARY KEY,
    -- The last message id given out in this account's sequence.
    last_id    INTEGER NOT NULL DEFAULT 0,
    -- How many messages are stored for it (queued or awaiting an ack), kept
    -- here so the queue bound costs no count.
    stored     INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);

-- A message stays here from acceptance until its recipient acknowledges it.
CREATE TABLE messages (
    recipient    TEXT    NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
    id           INTEGER NOT NULL,
    sender       TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    -- 0: queued for a fetch; 1: pushed or fetched, awaiting an ack.
    delivered    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient, id)
) WITHOUT ROWID;

-- Accounts, their message sequences, and what the engine needs to make
-- sends idempotent. Every id is allocated and every send id checked inside
-- the database, so any number of server processes may share it.

CREATE TABLE accounts (
    -- Byte order ("C"): the order names are listed in, as everywhere else.
    name          TEXT   NOT NULL COLLATE "C" PRIMARY KEY,
    -- An argon2id PHC string.
    password_hash TEXT,
    -- The last message id given out in this account's sequence.
    last_id       BIGINT NOT NULL,
    -- Messages stored for it (queued or awaiting an ack): the queue bound
    -- costs no count.
    stored        BIGINT NOT NULL DEFAULT 0,
    created_ms    BIGINT NOT NULL
);

-- The highest id any deleted account reached: a new account's ids start
-- above it, so ids never repeat for a name. One row; creates lock it, so a
-- create never starts below a delete that committed before it.
CREATE TABLE id_floor (
    only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 0),
    last_id  BIGINT  NOT NULL
);
INSERT INTO id_floor (only_row, last_id) VALUES (0, 0);

CREATE TABLE messages (
    recipient    TEXT    NOT NULL COLLATE "C" REFERENCES accounts (name) ON DELETE CASCADE,
    id           BIGINT  NOT NULL,
    sender       TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    timestamp_ms BIGINT  NOT NULL,
    -- false: queued for a fetch; true: pushed or fetched, awaiting an ack.
    delivered    BOOLEAN NOT NULL,
    PRIMARY KEY (recipient, id)
);

CREATE TABLE send_ids (
    sender       TEXT   NOT NULL COLLATE "C",
    send_id      BYTEA  NOT NULL,
    recipient    TEXT   NOT NULL,
    message_id   BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    -- CRC-32 of the body: a resend must be the same message.
    body_crc     BIGINT NOT NULL,
    PRIMARY KEY (sender, send_id)
);
CREATE INDEX send_ids_by_time ON send_ids (timestamp_ms);

-- Schema version 5: message ids never repeat for a name, not even across
-- deleting and re-creating the account. One row holds the id floor: the
-- highest last id of any account deleted so far. Deleting an account raises
-- it in the same transaction; creating one starts its ids above it.
CREATE TABLE id_floor (
    only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 0),
    last_id  INTEGER NOT NULL
);

-- Best effort for databases from before this version: the accounts deleted
-- earlier are gone with their last ids, so the floor starts at the highest
-- last id of the accounts that remain. That covers every old id only if
-- some remaining account got at least as far as any deleted one did; a
-- name deleted before this migration may still see its old ids again once.
INSERT INTO id_floor (only_row, last_id) SELECT 0, COALESCE(MAX(last_id), 0) FROM accounts;

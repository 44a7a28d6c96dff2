-- Schema version 7: accounts have passwords. Each account keeps the argon2id
-- PHC string of its password (never the password itself). Accounts created
-- before this version had no password, so the column is nullable and they
-- get NULL: "from before passwords". The engine treats such an account as
-- having to set a password, which it may do only at its next login over a
-- trusted connection; every account created from now on has a hash.
ALTER TABLE accounts ADD COLUMN password_hash TEXT;

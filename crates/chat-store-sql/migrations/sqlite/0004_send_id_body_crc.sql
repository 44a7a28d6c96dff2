-- Schema version 4: a resend must be the same message as the send it
-- repeats. Keep a CRC-32 of the body with each send id; rows from earlier
-- versions have none, and are checked by recipient alone.
ALTER TABLE send_ids ADD COLUMN body_crc INTEGER;

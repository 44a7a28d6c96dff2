-- Rate budgets every server process draws on (chat_core::budgets): failed
-- password attempts per account and per address, password checks, creates
-- and lists per address. A token bucket per key; times are the database's
-- clock in seconds since the epoch, so the processes' clocks do not matter.
CREATE TABLE budgets (
    key     TEXT             NOT NULL COLLATE "C" PRIMARY KEY,
    -- Tokens left at `updated`.
    tokens  DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    -- When the bucket is full again (and can be forgotten).
    full_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX budgets_by_full_at ON budgets (full_at);

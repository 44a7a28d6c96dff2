-- Several server processes (nodes) on one database: who is alive, and who
-- holds each login.

-- A node's heartbeat, in the database's clock (so clock skew between the
-- processes' machines does not matter): a node whose heartbeat is older
-- than the lease time is dead, and its leases may be taken over.
CREATE TABLE nodes (
    id           BIGINT      NOT NULL PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Generations only grow, across every account: the fencing token.
CREATE SEQUENCE lease_generation;

CREATE TABLE leases (
    name       TEXT   NOT NULL COLLATE "C" PRIMARY KEY,
    node       BIGINT NOT NULL,
    generation BIGINT NOT NULL
);
CREATE INDEX leases_by_node ON leases (node);

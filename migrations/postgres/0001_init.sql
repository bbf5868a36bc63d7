-- tandem's Postgres schema: the rooms registry, the append-only update log and one snapshot per room.
-- Room names compare and list in byte order: queries sort with COLLATE "C".

CREATE TABLE rooms (
    room       text PRIMARY KEY,
    kind       text NOT NULL DEFAULT 'yjs',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Identity ids are one sequence for the whole store, never reused. They are handed out before
-- commit, so rows can become visible out of id order: compaction deletes the ids it folded, never
-- an id range. The store reserves a batch's ids with nextval() and inserts them explicitly
-- (OVERRIDING SYSTEM VALUE), so that each id is known to name its own update.
CREATE TABLE updates (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room       text NOT NULL,
    data       bytea NOT NULL,
    origin     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX updates_room_id ON updates (room, id);

CREATE TABLE snapshots (
    room         text PRIMARY KEY,
    upto_id      bigint NOT NULL,
    state        bytea NOT NULL,
    state_vector bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

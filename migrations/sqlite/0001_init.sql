-- tandem's SQLite schema: the rooms registry, the append-only update log and one snapshot per room.
-- Timestamps are UTC, ISO-8601 text with milliseconds (SQLite has no timestamp type).

CREATE TABLE rooms (
    room       TEXT PRIMARY KEY NOT NULL,
    kind       TEXT NOT NULL DEFAULT 'yjs',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- AUTOINCREMENT: ids are never reused, even after the newest rows are compacted away, so an id
-- names one update forever and a snapshot's upto_id can never cover an update written after it.
CREATE TABLE updates (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    room       TEXT NOT NULL,
    data       BLOB NOT NULL,
    origin     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX updates_room_id ON updates (room, id);

CREATE TABLE snapshots (
    room         TEXT PRIMARY KEY NOT NULL,
    upto_id      INTEGER NOT NULL,
    state        BLOB NOT NULL,
    state_vector BLOB NOT NULL,
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- An append used to pay for three `strftime('%Y-%m-%dT%H:%M:%fZ', 'now')` calls (the update's
-- created_at and the rooms row's two defaults, built even when the room exists), and to rewrite
-- the room's row on every group commit: a fourth page in each commit's WAL frames besides the
-- log's table, its index and AUTOINCREMENT's sequence. Now the store binds created_at itself, the
-- trigger copies it, and a room's updated_at moves only when the second changes: it is the time of
-- the room's first append in the second of its latest one, and never moves backwards.
DROP TRIGGER updates_touch_room;

CREATE TRIGGER updates_touch_room AFTER INSERT ON updates
BEGIN
    INSERT INTO rooms (room, created_at, updated_at) VALUES (NEW.room, NEW.created_at, NEW.created_at)
        ON CONFLICT (room) DO UPDATE SET updated_at = excluded.updated_at
        WHERE substr(excluded.updated_at, 1, 19) > substr(rooms.updated_at, 1, 19);
END;

-- Every appended update registers its room from inside the INSERT statement itself, so that an
-- append of one multi-row INSERT is atomic without an explicit transaction: one round trip to
-- SQLite's thread per group commit instead of four (begin, insert, upsert the rooms, commit).
CREATE TRIGGER updates_touch_room AFTER INSERT ON updates
BEGIN
    INSERT INTO rooms (room) VALUES (NEW.room)
        ON CONFLICT (room) DO UPDATE SET updated_at = excluded.updated_at;
END;

-- The store registers an appended update's room itself, once per room and second, in the append's
-- own transaction (src/store/sqlite.rs, `append_on`). The trigger did it for every row: a program
-- of its own and a look into the rooms table and its index in each insert, about 9,000 of a
-- one-row append's 30,000 instructions, almost always to change nothing.
DROP TRIGGER updates_touch_room;

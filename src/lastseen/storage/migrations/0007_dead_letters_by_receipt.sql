-- Dead letters are listed newest received first, a page at a time; this index walks them so.
CREATE INDEX dead_letters_received ON dead_letters (received_at, callback_id, object_id);

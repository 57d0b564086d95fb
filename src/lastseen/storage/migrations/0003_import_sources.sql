-- Callbacks imported from files carry their source position ("file:line"); a second import of
-- the same file, or one resumed after a crash, stores nothing twice. Other callbacks have none.
ALTER TABLE callbacks ADD COLUMN source text;
CREATE UNIQUE INDEX callbacks_source ON callbacks (source) WHERE source IS NOT NULL;

-- A claim, a lease renewal and a release change only locked_until, locked_by and claims. With no
-- index on those columns and room left in each page, PostgreSQL makes such an update HOT: the new
-- version goes on the same page, no index gains an entry, and the WAL carries the changed bytes
-- instead of another copy of the id array (measured: 185 bytes of WAL per claim, not 2,100).
-- HOT needs the page's older versions pruned, which a snapshot older than them (a long
-- transaction, a standby's feedback) holds off.
-- callbacks_claimable served no query: claiming and expiring scan callbacks_pending_received,
-- and 0001's comment about claiming in locked_until order predates newest-first claims.
-- fillfactor 60 keeps room for one more version of a 200-id row in each page; existing pages
-- are left as they are.
-- The DROP needs the table to itself for a moment: rather than queue every instance's inserts
-- and claims behind it while some long transaction holds the table, it gives up after a few
-- seconds, and this instance retries its migration.
SET LOCAL lock_timeout = '5s';
DROP INDEX callbacks_claimable;
ALTER TABLE callbacks SET (fillfactor = 60);

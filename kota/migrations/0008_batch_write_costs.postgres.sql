-- Rollup marks are appended, one row per hour a batch touched, never upserted. With one row per hour
-- (ON CONFLICT DO NOTHING), the rollup job's DELETE ... RETURNING held the hour's row while it
-- recomputed the hour, and every batch marking that hour waited for it: in bench.processing the
-- processor stood still for the job's seconds each minute (the mark's INSERT took 41 ms a call on
-- average). The job now reads the marks, recomputes their hours, and deletes exactly the marks it
-- read (processing/maintenance.py); a mark added meanwhile stays for its next round.
ALTER TABLE rollup_dirty DROP CONSTRAINT rollup_dirty_pkey;
ALTER TABLE rollup_dirty ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;

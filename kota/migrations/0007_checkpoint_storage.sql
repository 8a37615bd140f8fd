-- Detector checkpoints are stored as they come, not compressed. A checkpoint holds float64 arrays
-- (1.2 kB a series, most of it the hour-of-day profiles): PostgreSQL's default compression (pglz)
-- barely shrinks them, and writing one of 17,800 series (23 MB) took 500-800 ms with it against
-- 130-210 ms without, inside the batch transaction that carries it: every checkpoint held up the
-- stream that long (bench.e2e: the p99 to the database; `python -m bench.checkpoints` times both).
ALTER TABLE detector_checkpoints ALTER COLUMN state SET STORAGE EXTERNAL;

-- Each poll reads only the lineages that need attention (`active`: not healthy, or still charged
-- for attempts) plus those of the runs it found corrupted, so a cycle's cost follows the fleet,
-- not the years of history behind it. Rows written before this migration count as active until
-- they are next written: reading a few too many is safe, missing one would not be.
ALTER TABLE lineages ADD COLUMN active INTEGER NOT NULL DEFAULT 1;
CREATE INDEX lineages_active ON lineages (active);
CREATE INDEX events_at ON events (at);

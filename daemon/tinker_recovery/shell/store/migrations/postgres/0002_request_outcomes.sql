-- Operator requests are settled one by one, each in the transaction that acts on it, and keep
-- their outcome ("started" or "refused") and its reason, so `recover --wait` can follow one.
ALTER TABLE manual_requests ADD COLUMN outcome TEXT;
ALTER TABLE manual_requests ADD COLUMN outcome_reason TEXT;
-- Holds say why, besides who.
ALTER TABLE holds ADD COLUMN reason TEXT;

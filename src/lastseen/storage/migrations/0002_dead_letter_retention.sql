-- Dead letters are pruned after their retention; the prune finds the old ones by this index.
CREATE INDEX dead_letters_created_at ON dead_letters (created_at);

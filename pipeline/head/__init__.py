"""Stage two: the attention head (docs/DESIGN.md, "The head"), batches from the cache, fit(), checkpoints."""

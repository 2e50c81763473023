"""Stage two: the attention head (DESIGN's equations), batches from the cache, fit(), checkpoints."""

"""Stage one: weights, the frozen backbone, the one extractor, the HDF5 cache and the rerun plan."""

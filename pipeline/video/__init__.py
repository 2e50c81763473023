"""A dataset on disk: exact in-order decoding, encoding, the synthetic set, class folders and the
boxes format, splits."""

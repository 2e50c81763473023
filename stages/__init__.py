"""One module per DVC stage: plain functions, params in, files out."""

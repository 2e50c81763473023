"""Watching a stream: sources and sampling, the reader's queue, the online model, the main loop, events, the
annotated video, the live view and the summary."""

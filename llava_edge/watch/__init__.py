"""The robot loop: ask one question about a stream of frames, one JSON line per sampled frame."""

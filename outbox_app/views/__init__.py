"""The views: pure functions of the log (search index, task cache), each with its read side."""

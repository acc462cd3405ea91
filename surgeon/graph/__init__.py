"""Graph surgery: tracing, the run-time census, site discovery, rule decisions, rewriting, plans, merging."""

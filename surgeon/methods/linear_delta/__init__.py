"""The linear depthwise adapter: a zero-initialised kernel delta beside the frozen kernel."""

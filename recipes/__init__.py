"""Shipped recipes (data), installed inside the package as surgeon.recipes."""

"""Adapter and memory methods behind one protocol (:mod:`surgeon.methods.base`), in one table
(:mod:`surgeon.methods.registry`)."""

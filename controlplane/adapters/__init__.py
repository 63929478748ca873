"""Thin adapters between the pool and the outside world (supervisord, workers, files)."""

"""modelpool control plane: registry, lifecycle, supervisord workers, control API."""

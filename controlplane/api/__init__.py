"""HTTP blueprints of the control plane."""

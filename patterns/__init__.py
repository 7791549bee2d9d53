"""layerpass.patterns."""

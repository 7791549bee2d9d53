"""layerpass.bench."""

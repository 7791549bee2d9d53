"""layerpass.passes."""

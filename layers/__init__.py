"""layerpass.layers."""

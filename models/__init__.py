"""layerpass.models."""

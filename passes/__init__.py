"""The layerpass compile backend, the pass manager and the passes."""

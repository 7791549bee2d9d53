"""The ``layerpass`` compile backend: split, piece hash and dedup, cache, report, config, doctor."""

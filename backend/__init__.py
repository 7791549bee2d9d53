"""The ``layerpass`` compile backend: ``layerpass.compile`` (``compiled_model.py``) and its config;
``regions/`` (layers traced once, the warm start), ``pieces/`` (split, piece hash, compile),
``cache/`` (artifacts, local and remote), ``report/``, ``doctor/``."""

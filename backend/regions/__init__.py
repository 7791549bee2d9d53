"""Regions: each distinct decoder layer of a model is traced by Dynamo once and compiled once,
then called at every layer (``router.py`` routes the calls, ``region.py`` is one traced
program and its check); the warm start saves those programs so a new process runs without
Dynamo (``warm_start.py``), with torch's AOT precompile in one place (``aot.py``), the guard
pickler fix (``guard_pickling.py``), every patch of a torch internal (``torch_patches.py``),
the staleness checks torch's guards leave out (``trace_deps.py``) and the structure
signatures regions and keys compare (``signature.py``).
"""

"""Doctor: why does a compiled model compile more than it should? The analyses and their
printout (``analysis.py``: ``diagnose``), pieces equal except for constants (``findings.py``), and what
``layerpass.compile`` did with the decoder layers, read from its report (``regions_report.py``).
"""

"""Report: what the last ``layerpass`` compile did (``compile_report.py``: ``CompileReport``) and
where its time went (``timeline.py``: named spans on one clock).
"""

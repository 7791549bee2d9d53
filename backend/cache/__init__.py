"""Cache: where compiled pieces and saved programs live. The artifact cache (``artifacts.py``),
a local dir then an optional remote store (``location.py``; ``remote_store.py``: Redis, sealed
values), one lock per key so processes compile each key once (``key_lock.py``), private file
modes and the trust check (``private_files.py``), and bundles to carry a compile to another
machine (``bundle.py``).
"""

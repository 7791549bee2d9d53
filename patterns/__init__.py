"""The fusions, one module each: pattern, replacement, example inputs, extra checks and the
``PatternPass`` subclass that registers them (``common`` holds the shared op handles)."""

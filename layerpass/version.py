"""The layerpass version, in one module every part of the package may import (the caches and saved
programs are keyed by it); the package root re-exports it as ``layerpass.__version__``."""

__version__ = "0.1.0"

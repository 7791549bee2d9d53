"""``python -m layerpass bench`` / ``python -m layerpass doctor``: the same as the ``layerpass`` script."""

import sys

from layerpass.cli import main

sys.exit(main())

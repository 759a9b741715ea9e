"""``python -m scripts.bench``: see :mod:`scripts.bench`."""

import sys

from scripts.bench.runner import main

sys.exit(main())

"""``python -m stream_meta.cli`` is the ``stream-meta`` command too."""

import sys

from stream_meta.cli import main

sys.exit(main())

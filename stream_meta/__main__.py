"""``python -m stream_meta`` is the ``stream-meta`` command."""

import sys

from stream_meta.cli import main

sys.exit(main())

"""`python -m processing`: the stream processor in the foreground (processing/workers.py)."""

import sys

from processing.workers import main

sys.exit(main())

"""`python -m cli ...`: the `kota` command."""

import sys

from cli.main import main

sys.exit(main())

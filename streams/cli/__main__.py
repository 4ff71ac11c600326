"""``python -m streams.cli``: the ``modelwatch`` command."""

import sys

from streams.cli.main import main

sys.exit(main())

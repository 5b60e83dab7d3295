"""``python -m tunekit ...`` runs the ``tunekit`` command line."""

import sys

from tunekit.cli import main

sys.exit(main())

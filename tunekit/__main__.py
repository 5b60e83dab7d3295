"""``python -m tunekit ...`` runs the ``tunekit`` command line."""

import sys

from tunekit.cli import main

# Guarded: a spawned worker of `tunekit finetune --nproc N` imports this module as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())

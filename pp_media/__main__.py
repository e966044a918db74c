"""``python -m pp_media``: the ``pp-media`` command."""

import sys

from pp_media._cli.main import main

if __name__ == "__main__":
    sys.exit(main())

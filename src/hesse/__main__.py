"""``python -m hesse``: the command line."""

import sys

from hesse._cli.main import main

sys.exit(main())

"""``python -m hesse._cli``."""

import sys

from hesse._cli.main import main

sys.exit(main())

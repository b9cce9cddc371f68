"""``python3 -m dingyuan.rescue``: the rescue tool from a checkout or an installed dingyuan."""

import sys

from .cli import main

sys.exit(main())

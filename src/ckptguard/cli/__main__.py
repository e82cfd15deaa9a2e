"""``python -m ckptguard.cli``: the same as the ``ckptguard`` command."""

import sys

from ckptguard.cli import main

sys.exit(main())

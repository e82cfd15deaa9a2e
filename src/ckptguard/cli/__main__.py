import sys

from ckptguard.cli import main

sys.exit(main())

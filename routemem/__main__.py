"""``python -m routemem`` (and ``torchrun -m routemem``) run the command line."""

import sys

from routemem.cli import main

sys.exit(main())

"""`python -m sparsezip` and `torchrun -m sparsezip`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m outlierlab`` (and ``torchrun -m outlierlab train ...``)."""

import sys

from outlierlab.cli import main

sys.exit(main())

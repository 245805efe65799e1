"""``python -m cm_core.experiments --grid FILE --out DIR``: see :mod:`cm_core.experiments.grid`."""
import sys

from .grid import main

sys.exit(main())

"""``python -m benchmarks.gpu``: see :mod:`benchmarks.gpu.check`."""

import sys

from benchmarks.gpu.check import main

sys.exit(main())

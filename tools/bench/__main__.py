"""`python -m tools.bench`, the same as `jaxvla bench`."""

import sys

from tools.bench.cli import main

sys.exit(main(sys.argv[1:]))

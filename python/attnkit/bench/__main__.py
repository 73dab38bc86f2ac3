"""`python -m attnkit.bench`: see attnkit.bench's docstring and docs/benchmarking.md."""
import sys

from . import main

sys.exit(main())

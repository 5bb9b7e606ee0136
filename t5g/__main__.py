"""`python -m t5g` runs the t5g command line."""

import sys

from t5g.cli import main

sys.exit(main())

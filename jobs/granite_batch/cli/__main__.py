"""`python -m granite_batch.cli`."""

import sys

from granite_batch.cli import main

sys.exit(main())

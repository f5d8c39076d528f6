"""`python -m privet …`, the same as the `privet` command."""

import sys

from privet.cli import main

sys.exit(main())

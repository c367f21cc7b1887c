"""`python -m lmpipe.cli`: the same as the `lmpipe` command."""

import sys

from lmpipe.cli.main import main

sys.exit(main())

"""``python -m mergejob.cli``: the ``mergejob`` command."""

import sys

from mergejob.cli import main

sys.exit(main())

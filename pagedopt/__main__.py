"""``python -m pagedopt`` runs the ``pagedopt`` command."""

import sys

from .cli import main

sys.exit(main())

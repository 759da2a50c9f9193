"""``python -m slt_jax.cli``: the ``slt-jax`` command."""

import sys

from slt_jax.cli import main

sys.exit(main())

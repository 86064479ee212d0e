"""``python -m dcq_ops.check``: see dcq_ops.check."""

import sys

from dcq_ops.check.command import main

sys.exit(main())

"""``python -m dcq_ops.train``: the training command line (also installed as
``dcq-train``). The application lives in dcq_ops.training."""

import sys

from dcq_ops.training.cli import main

if __name__ == "__main__":
    sys.exit(main())

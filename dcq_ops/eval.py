"""``python -m dcq_ops.eval``: verification on insightface ``.bin`` sets of a
dcq_ops.train checkpoint or an arcface_torch ``backbone.pth``. The command
lives in dcq_ops.training.evaluate (``evaluate`` returns the results)."""

import sys

from dcq_ops.training.evaluate import evaluate, main

__all__ = ["evaluate", "main"]

if __name__ == "__main__":
    sys.exit(main())

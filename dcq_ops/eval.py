"""``python -m dcq_ops.eval``: verification of a training checkpoint on insightface
``.bin`` sets. The application lives in dcq_ops.training."""

from dcq_ops.training.cli import eval_main as main

if __name__ == "__main__":
    main()

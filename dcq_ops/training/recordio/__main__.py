"""``python -m dcq_ops.training.recordio``: the pack / info / index commands
(:mod:`dcq_ops.training.recordio.cli`)."""

from dcq_ops.training.recordio.cli import main

if __name__ == "__main__":
    main()

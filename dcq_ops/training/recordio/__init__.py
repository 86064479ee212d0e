"""insightface's RecordIO training sets (``train.rec`` + ``train.idx``), read and
written without mxnet: the format and its index (:mod:`.format`), the reader
(:mod:`.reader`: :class:`RecordIOImages`), the writer (:mod:`.writer`:
:class:`RecordIOWriter`, :func:`pack_folder`) and the command line
(:mod:`.cli`; ``python -m dcq_ops.training.recordio pack|info|index``).

The application imports this package only where a RecordIO set is used, so that
importing :mod:`dcq_ops.training` stays light.
"""

from dcq_ops.training.recordio.cli import main
from dcq_ops.training.recordio.format import (MAGIC, build_index, is_recordio, pack_payload, read_index,
                                              resolve_paths, unpack_header)
from dcq_ops.training.recordio.reader import RecordIOImages, available_decoders, get_decoder
from dcq_ops.training.recordio.writer import RecordIOWriter, pack_folder

__all__ = [
    "MAGIC", "RecordIOImages", "RecordIOWriter", "available_decoders", "build_index", "get_decoder", "is_recordio",
    "main", "pack_folder", "pack_payload", "read_index", "resolve_paths", "unpack_header",
]

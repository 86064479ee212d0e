"""The RecordIO command line, ``python -m dcq_ops.training.recordio``::

    python -m dcq_ops.training.recordio pack FOLDER OUT_PREFIX   # FOLDER/<identity>/<image> -> OUT_PREFIX.rec/.idx
    python -m dcq_ops.training.recordio info PATH                # counts of a .rec (or a folder with train.rec),
                                                                 # every record read and every image decoded
    python -m dcq_ops.training.recordio index PATH.rec           # write the missing PATH.idx beside it

Bad arguments exit with status 2 and a message naming the problem; so does ``info``
on a set with a record that does not read or an image that does not decode (it names
them, and how many there are)."""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from dcq_ops.training.recordio.format import build_index
from dcq_ops.training.recordio.reader import RecordIOImages
from dcq_ops.training.recordio.writer import pack_folder


def main(argv: Sequence[str] | None = None) -> dict:
    """Run one command (pack, info, index); returns what it printed, as a dict (SystemExit 2
    for a bad argument)."""
    parser = argparse.ArgumentParser(prog="python -m dcq_ops.training.recordio",
                                     description="insightface RecordIO sets (train.rec + train.idx) without mxnet")
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="pack FOLDER/<identity>/<image> into OUT_PREFIX.rec and OUT_PREFIX.idx")
    pack.add_argument("folder")
    pack.add_argument("out_prefix", help="e.g. data/train writes data/train.rec + data/train.idx (config.rec = 'data')")
    pack.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize to N x N (or H W)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    pack.add_argument("--no-identity-records", action="store_true",
                      help="images only (readers then scan every image's label)")
    info = commands.add_parser("info", help="counts of a .rec (or a directory with train.rec)")
    info.add_argument("path")
    info.add_argument("--quick", action="store_true",
                      help="skip reading every record and decoding every image (counts and the first image only)")
    index = commands.add_parser("index", help="write the .idx of a .rec that lacks one (records numbered in "
                                              "file order, as MXNet's tools/rec2idx.py)")
    index.add_argument("rec")
    index.add_argument("--idx", help="where to write it (default: beside the .rec, same stem)")
    args = parser.parse_args(argv)
    if args.command == "index":
        try:
            result = build_index(args.rec, args.idx)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {result['idx']}: {result['records']} records of {result['rec']}")
        return result
    if args.command == "pack":
        size = args.image_size
        if size is not None and len(size) not in (1, 2):
            parser.error(f"--image-size takes N or H W, got {len(size)} values")
        size = None if size is None else (size[0], size[-1])
        try:
            result = pack_folder(args.folder, args.out_prefix, image_size=size, quality=args.quality,
                                 identity_records=not args.no_identity_records)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {result['images']} images of {result['identities']} identities to {result['rec']} "
              f"and {result['idx']}")
        return result
    try:
        source = RecordIOImages(args.path)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.quick:
        bad, problems = source.verify(decode=True)
        if bad:
            parser.error(f"{source.rec_path}: {bad} of {len(source)} image records do not read or decode:\n  "
                         + "\n  ".join(problems) + ("\n  ..." if bad > len(problems) else ""))
    counts = np.bincount(source.labels.numpy(), minlength=source.num_classes)
    shape = tuple(source.load_uint8([0]).shape[1:])
    result = {"rec": source.rec_path, "images": len(source), "identities": source.num_classes,
              "identity_records": source.has_identity_records, "singletons": int((counts == 1).sum()),
              "first_image_shape": shape}
    print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return result


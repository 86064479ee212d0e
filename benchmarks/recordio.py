#!/usr/bin/env python
"""Reading insightface RecordIO without mxnet: images/s of each installed JPEG
decoder, of a whole load (read + decode + normalise), and of opening a set with
and without identity records (the label scan).

    python benchmarks/recordio.py                       # 2000 112x112 faces, one thread
    python benchmarks/recordio.py --images 20000 --out benchmarks/results/recordio

The images are made here (nothing is downloaded): smooth random 112x112 RGB
"faces" (low-frequency colour fields plus mild pixel noise), JPEG quality 95
as insightface's packing tools write, packed with
``dcq_ops.training.recordio.pack_folder`` into a temporary folder. Their mean
JPEG size is reported: decode time grows with it, so compare with the sizes of
a real set (MS1MV3: about 7 KiB per image) before extrapolating.

Rows (passes over every image after one untimed pass, one process, torch and
the decoders at ``--threads`` threads; benchmarks/common.py ``time_stable``: at
least ``--repeats`` and at most ``--max-repeats`` passes, until the median has
settled or ``--budget-s`` of passes per row is spent; the median rate with the
min-max of the passes, a row too noisy to trust marked ``~``):

- ``decode/<name>``: the decoder alone, from JPEG bytes in memory to a uint8
  tensor [3, 112, 112];
- ``load/<name>``: ``RecordIOImages.load`` in batches of ``--batch-size``:
  ``os.pread`` from the .rec (in the page cache after the first pass), decode,
  stack, normalise to float in [-1, 1];
- ``open/identity_records`` and ``open/label_scan``: constructing
  ``RecordIOImages`` (reading the .idx, then the identity records, or every
  image's header), in images/s of the set.

Writes ``<out>.json`` (a ``meta`` block, rows, hardware, versions) when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import NOISY_LEGEND, format_table, hardware, meta, time_stable, versions, write_json  # noqa: E402


def make_faces(root: str, images: int, identities: int, size: int, seed: int) -> float:
    """Writes ``root/<identity>/<k>.jpg``; returns the mean JPEG size in bytes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    total = 0
    per_identity = np.array_split(np.arange(images), identities)
    for identity, members in enumerate(per_identity):
        folder = os.path.join(root, f"id{identity:06d}")
        os.makedirs(folder)
        base = torch.from_numpy(rng.normal(128, 50, (1, 3, 6, 6)).astype(np.float32))
        for k in range(len(members)):
            field = torch.nn.functional.interpolate(base + torch.from_numpy(
                rng.normal(0, 15, (1, 3, 6, 6)).astype(np.float32)), size=(size, size), mode="bicubic",
                align_corners=False)[0]
            pixels = field + torch.from_numpy(rng.normal(0, 4, (3, size, size)).astype(np.float32))
            array = pixels.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            path = os.path.join(folder, f"{k}.jpg")
            Image.fromarray(array).save(path, quality=95)
            total += os.path.getsize(path)
    return total / images


def timed(name: str, fn, images: int, args) -> dict:
    """One row: the median pass of ``fn`` (over ``images`` images), as images/s and seconds."""
    t = time_stable(fn, warmup=1, min_samples=args.repeats, max_samples=max(args.repeats, args.max_repeats),
                    budget_s=args.budget_s)
    return {"row": name, "images_per_s": images / t.median_s, "seconds": t.median_s, **t.fields("s")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="fewest timed passes per row")
    parser.add_argument("--max-repeats", type=int, default=20, help="most timed passes per row")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="seconds of timed passes per row, after which no pass is started")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="path without extension for the .json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews rates

    from dcq_ops.training.recordio import RecordIOImages, available_decoders, get_decoder, pack_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes = make_faces(os.path.join(tmp, "faces"), args.images, args.identities, args.size, args.seed)
        pack_folder(os.path.join(tmp, "faces"), os.path.join(tmp, "data", "train"))
        pack_folder(os.path.join(tmp, "faces"), os.path.join(tmp, "flat"), identity_records=False)
        n = args.images
        for name in available_decoders():
            source = RecordIOImages(os.path.join(tmp, "data"), decoder=name)
            encoded = [source.read_image_bytes(i) for i in range(n)]
            _, decode = get_decoder(name)
            rows.append(timed(f"decode/{name}", lambda: [decode(data, None) for data in encoded], n, args))
            batches = np.array_split(np.arange(n), max(1, n // args.batch_size))
            rows.append(timed(f"load/{name}", lambda: [source.load(b) for b in batches], n, args))
        for row, path in (("open/identity_records", os.path.join(tmp, "data")),
                          ("open/label_scan", os.path.join(tmp, "flat.rec"))):
            rows.append(timed(row, lambda: RecordIOImages(path), n, args))

    import PIL
    hw = hardware()
    result = {
        "config": vars(args), "mean_jpeg_bytes": mean_bytes, "rows": rows,
        "hardware": {"cpu": hw["cpu"], "cores": hw["cpu_count"], "threads": args.threads,
                     "machine": hw["machine"], "load_average_1min_before": load_before},
        "versions": versions(pillow=PIL.__version__, numpy=np.__version__,
                             torchvision=(sys.modules["torchvision"].__version__ if "torchvision" in sys.modules
                                          else "not installed")),
        "decoders_installed": available_decoders(),
    }
    print(f"{n} images {args.size}x{args.size}, mean JPEG {mean_bytes / 1024:.1f} KiB, {args.threads} thread(s), "
          f"{hw['cpu']} ({hw['cpu_count']} cores)")
    print(format_table(["row", "images/s", "median s", "min-max s", "spread", "n"],
                       [[r["row"], ("" if r["stable"] else "~") + f"{r['images_per_s']:.0f}", f"{r['seconds']:.3f}",
                         f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{100 * r['spread']:.0f}%", str(r["samples"])]
                        for r in rows]))
    if not all(r["stable"] for r in rows):
        print(NOISY_LEGEND)
    if args.out:
        write_json(args.out + ".json", result, meta("recordio.py", argv))
    return result


if __name__ == "__main__":
    main()

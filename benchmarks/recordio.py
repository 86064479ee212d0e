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

Rows (median of ``--repeats`` passes over every image, one process, torch and
the decoders at ``--threads`` threads):

- ``decode/<name>``: the decoder alone, from JPEG bytes in memory to a uint8
  tensor [3, 112, 112];
- ``load/<name>``: ``RecordIOImages.load`` in batches of ``--batch-size``:
  ``os.pread`` from the .rec (in the page cache after the first pass), decode,
  stack, normalise to float in [-1, 1];
- ``open/identity_records`` and ``open/label_scan``: constructing
  ``RecordIOImages`` (reading the .idx, then the identity records, or every
  image's header), in images/s of the set.

Writes ``<out>.json`` (rows, hardware, versions) when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hardware import cpu_model  # noqa: E402


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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
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
            decode(encoded[0], None)  # warm-up (imports, first allocations)
            seconds = timed(lambda: [decode(data, None) for data in encoded], args.repeats)
            rows.append({"row": f"decode/{name}", "images_per_s": n / seconds, "seconds": seconds})
            batches = np.array_split(np.arange(n), max(1, n // args.batch_size))
            seconds = timed(lambda: [source.load(b) for b in batches], args.repeats)
            rows.append({"row": f"load/{name}", "images_per_s": n / seconds, "seconds": seconds})
        for row, path in (("open/identity_records", os.path.join(tmp, "data")),
                          ("open/label_scan", os.path.join(tmp, "flat.rec"))):
            seconds = timed(lambda: RecordIOImages(path), args.repeats)
            rows.append({"row": row, "images_per_s": n / seconds, "seconds": seconds})

    import PIL
    result = {
        "config": vars(args), "mean_jpeg_bytes": mean_bytes, "rows": rows,
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                     "machine": platform.machine(), "load_average_1min_before": load_before},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
                     "numpy": np.__version__,
                     "torchvision": (sys.modules["torchvision"].__version__ if "torchvision" in sys.modules
                                     else "not installed")},
        "decoders_installed": available_decoders(),
    }
    print(f"{n} images {args.size}x{args.size}, mean JPEG {mean_bytes / 1024:.1f} KiB, {args.threads} thread(s), "
          f"{result['hardware']['cpu']} ({result['hardware']['cores']} cores)")
    for r in rows:
        print(f"  {r['row']:<24} {r['images_per_s']:>10.0f} images/s   ({r['seconds']:.3f} s)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

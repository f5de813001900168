"""P2: CPU image preparation, one core: vlmtag's prepare_image against plain Pillow.

Plain Pillow is what a straightforward loader does: open -> convert("RGB") -> resize (BICUBIC, Pillow's default)
-> JPEG quality 90. Both produce the same output size. Sources are photo-like JPEGs (scikit-image photos upscaled,
quality 90), all distinct so that no cache can help. Rounds are interleaved (Pillow, vlmtag, Pillow, vlmtag, ...);
the table shows the median round and the best round.

    .venv/bin/python benchmarks/p2_preprocess.py [--rounds 5] [--images 8]
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy/OpenCV start their pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from vlmtag.images import max_pixels_for_short_side, prepare_image  # noqa: E402
from vlmtag.images.prepare import DEFAULT_MAX_PIXELS, target_size  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def pin_to_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)
    return cpu


def sources(width: int, height: int, count: int) -> list[bytes]:
    """`count` distinct photo-like JPEGs (q90) of width x height."""
    from skimage import data

    out = []
    for i in range(count):
        im = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        if (i // len(PHOTOS)) % 2:
            im = ImageOps.mirror(im)
        im = ImageOps.fit(im, (width, height), Image.Resampling.BICUBIC, centering=(0.5, 0.4 + 0.05 * (i % 4)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    assert len(set(out)) == count
    return out


def pillow_plain(raw: bytes, size: tuple[int, int]) -> bytes:
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(fn, items: list, min_seconds: float) -> float:
    """Images per second over passes through `items`, at least `min_seconds` long."""
    n, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        n += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    ap.add_argument("--images", type=int, default=8, help="distinct source images per size (default 8)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum length of one round (default 1.0)")
    args = ap.parse_args()

    cpu = pin_to_one_core()
    print(f"P2 preprocess: one core (cpu {cpu}), {args.rounds} interleaved rounds of >= {args.seconds:g}s, "
          f"{args.images} distinct q90 JPEGs per size; Pillow {Image.__version__}, OpenCV {cv2.__version__}")

    rows = []
    for width, height in [(1920, 1080), (4032, 3024), (640, 480)]:
        raws = sources(width, height, args.images)
        targets = [("short side 448", max_pixels_for_short_side(width, height, 448))]
        targets.append(("default 802,816", DEFAULT_MAX_PIXELS))
        for label, max_pixels in targets:
            if width == 640 and label != "default 802,816":
                continue  # the small source is here for the pass-through case only
            size = target_size(width, height, max_pixels)
            ours_out = prepare_image(raws[0], max_pixels=max_pixels)
            assert (ours_out.width, ours_out.height) == size, ((ours_out.width, ours_out.height), size)
            base_rates, our_rates = [], []
            for _ in range(args.rounds):
                base_rates.append(rate(lambda r: pillow_plain(r, size), raws, args.seconds))
                our_rates.append(rate(lambda r: prepare_image(r, max_pixels=max_pixels), raws, args.seconds))
            passthrough = ours_out.data == raws[0]
            rows.append((f"{width}x{height}", label + (" (pass-through)" if passthrough else ""),
                         f"{size[0]}x{size[1]}", base_rates, our_rates))

    head = ("source", "target", "output", "Pillow img/s", "vlmtag img/s", "ratio", "best Pillow", "best vlmtag")
    table = [head]
    for src, label, out, base, ours in rows:
        mb, mo = statistics.median(base), statistics.median(ours)
        ratio = f"{mo / mb:.2f}x"
        table.append((src, label, out, f"{mb:.1f}", f"{mo:.1f}", ratio, f"{max(base):.1f}", f"{max(ours):.1f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print("\nimg/s and ratio: median of the rounds; best: the fastest round.")


if __name__ == "__main__":
    main()

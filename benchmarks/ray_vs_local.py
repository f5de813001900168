"""Ray vs local on the same machine and workload, in the same run: what does `executor_type: ray` cost?

Two workloads, each run end to end through `vlmtag.run.run_recipe` (read the JSONL, tag, checkpoint, write
the export), with the answer cache off so every run does all the work:

- api: distinct small PNGs (16x16 to 48x48) against the zero-latency loopback server (tests/openai_server.py
  in its own process), default concurrency (32) and batch size (256). The model costs nothing here, so this
  measures the executors' own overhead.
- embedded: distinct JPEGs (crops of the four scikit-image photos, 240 to 480 px wide) through the embedded
  default model (`builtin:default`, CPU-bound), batch size 8.

Executors: `local` (one process), `np` processes (embedded only: the run ignores np for API engines), and
Ray with `np` actors on a local Ray instance started once (`ray.init(num_cpus=<cores>)`, timed on its own).
A Ray run includes starting its actor pool and building one engine per actor. Two sizes per workload give a
fixed cost and a per-image cost for each executor. Best of `--rounds`, rounds interleaved; exports are
compared across executors.

Ray's worker processes run at nice 15 (`RAY_worker_niceness`): on a machine shared with other busy processes
they get a small share of the CPU and Ray's numbers fall far behind. Run it on a quiet machine; the load
average is printed before and after.

    .venv/bin/python benchmarks/ray_vs_local.py [--images 512,4096] [--photos 64,256] [--np 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import ServerProcess  # noqa: E402

from vlmtag.config import parse_recipe  # noqa: E402
from vlmtag.run import run_recipe  # noqa: E402


def api_dataset(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        size = (16 + i % 33, 16 + (i * 7) % 33)
        Image.new("RGB", size, (i % 251, (i * 7) % 253, (i * 13) % 255)).save(folder / "images" / f"{i:05d}.png")
        rows.append({"images": [f"images/{i:05d}.png"], "text": f"image {i}"})
    dataset = folder / "api.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataset


def photo_dataset(folder: Path, count: int) -> Path:
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]
    (folder / "photos").mkdir(parents=True)
    rows = []
    for i in range(count):
        im = photos[i % 4]
        k = i // 4
        box = (k % 50, (k // 50) % 50, im.width - 30, im.height - 20)  # a distinct crop per image
        width = 240 + (k * 16) % 241
        crop = im.crop(box)
        crop = crop.resize((width, max(1, round(width * crop.height / crop.width))))
        crop.save(folder / "photos" / f"{i:04d}.jpg", quality=90)
        rows.append({"images": [f"photos/{i:04d}.jpg"], "text": ""})
    dataset = folder / "photos.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataset


def timed_run(dataset: Path, export: Path, op: dict, **recipe_keys) -> tuple[float, dict]:
    recipe = parse_recipe({"dataset_path": str(dataset), "export_path": str(export), "use_cache": False,
                           "process": [{"image_tagging_vlm_mapper": op}], **recipe_keys})
    start = time.perf_counter()
    result = run_recipe(recipe)
    wall = time.perf_counter() - start
    assert result.aborted is None, result.aborted
    return wall, result.stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="512,4096", help="API workload sizes, comma-separated")
    p.add_argument("--photos", default="64,256", help="embedded workload sizes, comma-separated")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="best of N, rounds interleaved")
    args = p.parse_args()
    images = [int(x) for x in args.images.split(",")]
    photos = [int(x) for x in args.photos.split(",")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; np={args.np}; "
          f"best of {args.rounds}", flush=True)

    import ray

    with tempfile.TemporaryDirectory() as tmp, ServerProcess(decode=False) as server:
        tmp = Path(tmp)
        api_op = {"api_or_hf_model": "test-model", "is_api_model": True,
                  "model_params": {"base_url": server.base_url, "api_key": "x"}}
        embedded_op = {"api_or_hf_model": "builtin:default", "batch_size": 8}
        workloads = [("api", n, api_dataset(tmp / f"api{n}", n), api_op) for n in images]
        workloads += [("embedded", n, photo_dataset(tmp / f"emb{n}", n), embedded_op) for n in photos]
        ray_name = f"ray np={args.np}"
        executors = {"local": {}, f"np={args.np}": {"np": args.np}, ray_name: {"executor_type": "ray", "np": args.np}}
        best: dict[tuple[str, int, str], float] = {}
        exports: dict[tuple[str, int, str], str] = {}
        init = 0.0
        for r in range(args.rounds):
            for name, keys in executors.items():
                if name == ray_name:
                    start = time.perf_counter()
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
                    init = time.perf_counter() - start if r == 0 else min(init, time.perf_counter() - start)
                try:
                    for workload, n, dataset, op in workloads:
                        if workload == "api" and name.startswith("np="):
                            continue  # the run ignores np for API engines
                        export = tmp / "out" / f"{workload}{n}-{name}-{r}.jsonl"
                        wall, stats = timed_run(dataset, export, op, **keys)
                        assert stats.tagged == n, stats
                        key = (workload, n, name)
                        best[key] = min(best.get(key, wall), wall)
                        exports[key] = export.read_text()
                        print(f"  round {r + 1}: {workload:8s} {n:5d}  {name:10s} {wall:7.2f} s", flush=True)
                finally:
                    if name == ray_name:
                        ray.shutdown()

    same = all(exports[(w, n, ray_name)] == exports[(w, n, "local")] == exports.get((w, n, f"np={args.np}"),
               exports[(w, n, "local")]) for w, n, _, _ in workloads)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print(f"ray.init (a local instance, {os.cpu_count()} CPUs): {init:.2f} s")
    print(f"exports identical across executors: {same}\n")
    print(f"| workload | local | np={args.np} processes | Ray, np={args.np} actors | Ray / local | "
          f"(Ray + ray.init) / local |")
    print("|---|---|---|---|---|---|")
    for workload, n, _, _ in workloads:
        local, on_ray = best[(workload, n, "local")], best[(workload, n, ray_name)]
        procs = best.get((workload, n, f"np={args.np}"))
        label = f"{n} images, zero-latency API server" if workload == "api" else f"{n} photos, embedded model"
        print(f"| {label} | {local:.2f} s ({n / local:.0f}/s) | "
              + (f"{procs:.2f} s ({n / procs:.0f}/s)" if procs else "not used (API engine)")
              + f" | {on_ray:.2f} s ({n / on_ray:.0f}/s) | {on_ray / local:.2f}x | {(on_ray + init) / local:.2f}x |")
    for workload in ("api", "embedded"):
        sizes = sorted(n for w, n, _, _ in workloads if w == workload)
        if len(sizes) >= 2:
            a, b = sizes[0], sizes[-1]
            for name in executors:
                if (workload, a, name) in best:
                    per = (best[(workload, b, name)] - best[(workload, a, name)]) / (b - a)
                    fixed = best[(workload, a, name)] - per * a
                    print(f"{workload:8s} {name:10s}: fixed {fixed:6.2f} s + {per * 1000:6.2f} ms per image "
                          f"(from the {a} and {b} runs)")


if __name__ == "__main__":
    main()

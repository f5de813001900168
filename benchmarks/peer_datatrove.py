"""Peer: vlmtag vs Hugging Face DataTrove's InferenceRunner, the tool users would otherwise pick.

Both tag the same JSONL dataset (`{"images": ["images/x.jpg"], "text": "..."}`) through the same loopback
OpenAI-compatible server (tests/openai_server.py, its own process, answering from the image hash), 32
requests in flight, each as a whole process (start-up included):

- vlmtag: `.venv/bin/vlmtag run --config recipe.yaml`, a recipe with default settings (concurrency 32), each
  round in a fresh folder so its answer cache starts empty; its sources compiled to bytecode first, as an
  installed package's are (`compile_sources`).
- DataTrove 0.10.1 in its own venv (`.venv-peer-datatrove`, built on first use: datatrove, plus httpx, orjson
  and aiofiles for its endpoint mode, and Pillow), running a user script written as a competent user would
  (it is written into the work folder as `datatrove_tagging.py`; read it there): `JsonlReader` ->
  `InferenceRunner` with `server_type="endpoint"` (DataTrove's mode for a server already running; on a
  loopback http URL it posts each request on a new connection) -> `JsonlWriter` (uncompressed, as vlmtag
  writes), `LocalPipelineExecutor` with one task, no checkpoints (DataTrove's default). Its rollout function
  builds the same chat request vlmtag sends (same system prompt, user text and `max_tokens`, from
  vlmtag.prompts and vlmtag.defaults), preparing each image in a thread pool passed through `shared_context`:
  a file of at most 802,816 px goes as it is (data URL with its MIME type), a larger one is opened with
  Pillow, `draft` + `resize` to at most 802,816 px and sent as JPEG q90. `max_concurrent_generations=32`;
  `max_concurrent_documents=64`, raised as DataTrove's README advises when pre-processing is heavy.

Workloads: 2,048 distinct 64x64 JPEGs, and 512 distinct 1920x1080 JPEG photos (q90, crops of scikit-image's
public-domain sample photos with film grain), each against a server that answers at once and one that takes
0.5 s per request with 32 slots (limit 64 img/s). The server answers from the image hash (`decode=False`), so
at latency 0 the clients' own CPU is what limits the rate.

Measured per client run: wall time -> img/s; CPU (user + sys of the process and its reaped children, from
`os.wait4`) -> ms per image; peak RSS (`ru_maxrss` from `os.wait4`: the largest single process of the tree).
Clients alternate (vlmtag, DataTrove, vlmtag, ...), best of `--rounds` by img/s; CPU and RSS are those of
that best round. Every round is checked: rows in = rows out, every image tagged, no error; for the small
images (sent as the same bytes by both) the two clients' tags must be identical.

    .venv/bin/python benchmarks/peer_datatrove.py [--workloads small-0s,photos-0.5s] [--rounds 3]
                                                  [--only vlmtag|datatrove] [--keep DIR] [--timeout 600]

`--keep DIR` keeps the datasets (reused by later runs with the same DIR), the outputs and every client's log;
a client run past `--timeout` seconds is killed and counted as failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import ServerProcess  # noqa: E402

from vlmtag.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOKENS  # noqa: E402
from vlmtag.prompts import (  # noqa: E402
    DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN, DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT,
)

PEER_VENV = ROOT / ".venv-peer-datatrove"
# DataTrove's endpoint mode needs, of its `inference` extra (the rest is vLLM, SGLang and checkpointing), httpx
# (readiness probe), orjson (JSONL reader/writer, the runner's checkpoint module) and aiofiles (imported for
# every document written, checkpoints or not); Pillow and httpx at the versions of .venv.
PEER_PACKAGES = ("datatrove==0.10.1", "httpx==0.28.1", "orjson==3.13.0", "aiofiles==25.1.0", "Pillow==13.0.0")
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
CONCURRENCY = 32
VLMTAG = ROOT / ".venv" / "bin" / "vlmtag"
# name: (dataset, server latency in s, server slots)
WORKLOADS = {
    "small-0s": ("small", 0.0, None),
    "small-0.5s": ("small", 0.5, 32),
    "photos-0s": ("photos", 0.0, None),
    "photos-0.5s": ("photos", 0.5, 32),
}

DATATROVE_SCRIPT = '''\
"""Tag the images of a JSONL dataset with DataTrove's InferenceRunner and an OpenAI-compatible endpoint."""

import argparse
import asyncio
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from PIL import Image

SYSTEM_PROMPT = @SYSTEM_PROMPT@
INPUT_TEMPLATE = @INPUT_TEMPLATE@
SPECIAL_TOKENS = @SPECIAL_TOKENS@
MAX_PIXELS = @MAX_PIXELS@
MAX_TOKENS = @MAX_TOKENS@


def image_data_url(path: Path) -> str:
    """The image as a data URL: the file as it is when small enough, else downscaled and sent as JPEG q90."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if width * height <= MAX_PIXELS:
            return f"data:{im.get_format_mimetype()};base64," + base64.b64encode(data).decode()
        scale = (MAX_PIXELS / (width * height)) ** 0.5
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        im.draft("RGB", size)  # JPEG: decode at a reduced scale when that is still >= size
        small = im.convert("RGB").resize(size)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def user_text(text: str) -> str:
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return INPUT_TEMPLATE.replace("{text}", " ".join(text.split()) or "(none)")


@contextmanager
def image_threads(root: Path):
    with ThreadPoolExecutor() as pool:
        yield {"pool": pool, "root": root}


async def tag_row(document, generate, pool, root):
    loop = asyncio.get_running_loop()
    urls = await asyncio.gather(
        *(loop.run_in_executor(pool, image_data_url, root / p) for p in document.metadata["images"]))
    text = user_text(document.text)
    results = await asyncio.gather(*(generate({"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image_url", "image_url": {"url": url}}]},
    ]}) for url in urls))
    return {"image_tags": [json.loads(r.text)["tags"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--logs", required=True)
    parser.add_argument("--endpoint", required=True, help="http://HOST:PORT (DataTrove adds /v1/chat/completions)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    dataset = Path(args.dataset).resolve()
    config = InferenceConfig(
        server_type="endpoint", endpoint_url=args.endpoint, model_name_or_path=args.model,
        default_generation_params={"max_tokens": MAX_TOKENS},
        max_concurrent_generations=args.concurrency, max_concurrent_documents=2 * args.concurrency,
    )
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(dataset.parent), glob_pattern=dataset.name, recursive=False),
            InferenceRunner(rollout_fn=tag_row, config=config, shared_context=partial(image_threads, dataset.parent),
                            output_writer=JsonlWriter(args.output, compression=None)),
        ],
        logging_dir=args.logs, tasks=1, workers=1,
    ).run()


if __name__ == "__main__":
    main()
'''


def ensure_peer_env() -> Path:
    """The DataTrove venv's python, building the venv first when it is missing or has other versions."""
    python = PEER_VENV / "bin" / "python"
    check = ("import importlib.metadata as m, sys; sys.exit(any(m.version(p.split('==')[0]) != p.split('==')[1] "
             f"for p in {PEER_PACKAGES!r}))")
    if python.exists() and subprocess.run([python, "-c", check], check=False, capture_output=True).returncode == 0:
        return python
    print(f"building {PEER_VENV.name} with {' '.join(PEER_PACKAGES)} ...", flush=True)
    if shutil.which("uv"):
        subprocess.run(["uv", "venv", "--python", sys.executable, str(PEER_VENV)], check=True)
        subprocess.run(["uv", "pip", "install", "--python", str(python), *PEER_PACKAGES], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def write_rows(folder: Path, names: list[str], what: str) -> Path:
    rows = [{"images": [n], "text": f"{DEFAULT_IMAGE_TOKEN} {what} number {i} of the benchmark set"}
            for i, n in enumerate(names)]
    dataset = folder / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataset


def write_small(folder: Path, count: int = 2048) -> Path:
    """`count` distinct 64x64 JPEGs (q90): a colour gradient with noise, seeded by the index."""
    (folder / "images").mkdir(parents=True)
    ramp = np.linspace(0, 1, 64)[None, :, None]
    names = []
    for i in range(count):
        rng = np.random.default_rng(i)
        base = rng.integers(0, 256, 3) * (1 - ramp) + rng.integers(0, 256, 3) * ramp.transpose(1, 0, 2)
        pixels = np.clip(base + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        names.append(f"images/small_{i:05d}.jpg")
        Image.fromarray(pixels).save(folder / names[-1], quality=90)
    return write_rows(folder, names, "small image")


def write_photos(folder: Path, count: int = 512) -> Path:
    """`count` distinct 1920x1080 JPEGs (q90): 16:9 crops of scikit-image's colour sample photos, shifted and
    zoomed per image, upscaled, with film grain (so the JPEGs weigh what real photos do)."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(),
               data.immunohistochemistry(), data.retina(), data.stereo_motorcycle()[0]]
    (folder / "images").mkdir(parents=True)
    names = []
    for i in range(count):
        src, variant = sources[i % len(sources)], i // len(sources)
        h, w = src.shape[:2]
        cw = int(min(w, h * 16 / 9) * (0.6 + 0.4 * (variant % 5) / 4))
        ch = int(cw * 9 / 16)
        x = (variant * 37) % (w - cw + 1)
        y = (variant * 23) % (h - ch + 1)
        im = Image.fromarray(src[y:y + ch, x:x + cw]).resize((1920, 1080), Image.LANCZOS)
        if variant % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        grain = np.random.default_rng(i).integers(-6, 7, (1080, 1920, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(im, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        names.append(f"images/photo_{i:04d}.jpg")
        Image.fromarray(pixels).save(folder / names[-1], quality=90)
    return write_rows(folder, names, "photo")


def dataset_for(work: Path, kind: str) -> Path:
    folder = work / kind
    if not (folder / "dataset.jsonl").exists():
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        (write_small if kind == "small" else write_photos)(folder)
        print(f"wrote the {kind} dataset in {time.perf_counter() - start:.0f} s", flush=True)
    sizes = [p.stat().st_size for p in (folder / "images").iterdir()]
    print(f"{kind}: {len(sizes)} images in {folder}, {sum(sizes) / len(sizes) / 1024:.0f} KB each on average",
          flush=True)
    return folder / "dataset.jsonl"


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_measured(cmd: list, log: Path, timeout: float) -> dict:
    """Run `cmd` as a whole process: wall s, CPU s (user+sys with reaped children), peak RSS MB, exit code.
    Past `timeout` seconds its process group is killed (exit status -9)."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                start_new_session=True)
        timer = threading.Timer(timeout, kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: take the client down too
            kill_group(proc.pid)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "log": log}


def read_jsonl(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]


def run_vlmtag(dataset: Path, folder: Path, base_url: str, timeout: float) -> tuple[dict, list[str], dict]:
    export = folder / "out" / "tagged.jsonl"
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "project_name": "peer-datatrove", "dataset_path": str(dataset), "export_path": str(export),
        "process": [{"image_tagging_vlm_mapper": {
            "api_or_hf_model": MODEL, "is_api_model": True,
            "model_params": {"base_url": base_url, "api_key": "EMPTY"}}}],
    }, indent=1))
    result = run_measured([VLMTAG, "run", "--config", recipe], folder / "vlmtag.log", timeout)
    problems, answers = [], {}
    rows = read_jsonl([export]) if export.exists() else []
    for row in rows:
        meta = row.get("__dj__meta__", {})
        tags, errors = meta.get("image_tags", []), meta.get("image_tags_errors", [])
        if len(tags) != len(row["images"]) or not all(tags) or any(errors):
            problems.append(f"row {row['images']}: tags {tags}, errors {errors}")
        answers.update(zip(row["images"], tags))
    return result, problems + count_problem(rows, dataset), answers


def run_datatrove(python: Path, script: Path, dataset: Path, folder: Path, base_url: str,
                  timeout: float) -> tuple[dict, list, dict]:
    output = folder / "out"
    cmd = [python, script, "--dataset", dataset, "--output", output, "--logs", folder / "logs",
           "--endpoint", base_url.removesuffix("/v1"), "--model", MODEL, "--concurrency", CONCURRENCY]
    result = run_measured(cmd, folder / "datatrove.log", timeout)
    problems, answers = [], {}
    rows = read_jsonl(sorted(output.glob("*.jsonl"))) if output.exists() else []
    for row in rows:
        meta = row.get("metadata", {})
        rollouts = meta.get("rollout_results") or [{}]
        tags = rollouts[0].get("image_tags", [])
        if len(tags) != len(meta.get("images", [])) or not all(tags):
            problems.append(f"row {row.get('id')}: {rollouts}")
        answers.update(zip(meta.get("images", []), tags))
    if len({row.get("id") for row in rows}) != len(rows):
        problems.append("duplicate ids in the output")
    return result, problems + count_problem(rows, dataset), answers


def compile_sources() -> None:
    """vlmtag's sources to bytecode, as DataTrove's were when pip installed it. An editable install is compiled by
    Python on its first run, unless PYTHONDONTWRITEBYTECODE is set (it is on these machines): then every run
    would compile all of vlmtag again (~50 ms before the first request)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "vlmtag")], check=True)


def count_problem(rows: list, dataset: Path) -> list[str]:
    expected = sum(1 for _ in dataset.open())
    return [] if len(rows) == expected else [f"{expected} rows in, {len(rows)} rows out"]


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("vlmtag", "datatrove"))
    parser.add_argument("--keep", type=Path, help="work folder to keep (datasets there are reused)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a client run may take before it is killed")
    args = parser.parse_args()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    clients = [args.only] if args.only else ["vlmtag", "datatrove"]
    python = ensure_peer_env() if "datatrove" in clients else None

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="vlmtag-peer-dt-")
    work = (args.keep or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    script = work / "datatrove_tagging.py"
    script.write_text(
        DATATROVE_SCRIPT.replace("@SYSTEM_PROMPT@", repr(DEFAULT_SYSTEM_PROMPT))
        .replace("@INPUT_TEMPLATE@", repr(DEFAULT_INPUT_TEMPLATE))
        .replace("@SPECIAL_TOKENS@", repr((DEFAULT_IMAGE_TOKEN, DEFAULT_EOC_TOKEN)))
        .replace("@MAX_PIXELS@", f"{DEFAULT_MAX_PIXELS:_}").replace("@MAX_TOKENS@", str(DEFAULT_MAX_TOKENS)))

    if "vlmtag" in clients:
        compile_sources()
    failures, table = [], []
    load_before = os.getloadavg()
    for name in names:
        kind, latency, slots = WORKLOADS[name]
        dataset = dataset_for(work, kind)
        count = sum(1 for _ in dataset.open())
        best: dict[str, dict] = {}
        with ServerProcess(latency=latency, slots=slots, decode=False) as server:
            for r in range(args.rounds):
                answers = {}
                for client in clients:
                    folder = work / "runs" / name / f"{client}-{r}"
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    if client == "vlmtag":
                        result, problems, answers[client] = run_vlmtag(dataset, folder, server.base_url, args.timeout)
                    else:
                        result, problems, answers[client] = run_datatrove(python, script, dataset, folder,
                                                                          server.base_url, args.timeout)
                    if result["rc"]:
                        killed = " (killed: over --timeout)" if result["wall"] >= args.timeout else ""
                        problems.insert(0, f"exit status {result['rc']}{killed}; log {result['log']}:\n"
                                           + tail(result["log"]))
                    rate = count / result["wall"]
                    print(f"{name} round {r + 1} {client:9s} {rate:7.1f} img/s  {1000 * result['cpu'] / count:6.2f} "
                          f"CPU ms/img  {result['rss']:6.0f} MB  {'OK' if not problems else 'FAILED'}", flush=True)
                    if problems:
                        failures.append(f"{name} round {r + 1} {client}: " + "; ".join(problems[:5]))
                        print(f"!!! FAILED: {failures[-1]}", flush=True)
                    elif rate > best.get(client, {}).get("rate", 0):
                        best[client] = {**result, "rate": rate}
                if kind == "small" and len(answers) == 2 and answers["vlmtag"] != answers["datatrove"]:
                    failures.append(f"{name} round {r + 1}: the two clients' tags differ for the same image bytes")
                    print(f"!!! FAILED: {failures[-1]}", flush=True)
        print(f"{name}: server {server.summary}", flush=True)  # with latency: 32 at once = both kept 32 in flight
        table.append((name, latency, slots, count, best))

    print(f"\n{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"{CONCURRENCY} requests in flight; best of {args.rounds} rounds by img/s, CPU and RSS of that round; "
          f"DataTrove {PEER_PACKAGES[0].split('==')[1]}\n")
    print("| workload | server | DataTrove img/s | vlmtag img/s | vlmtag/DataTrove | CPU ms/img DT | vlmtag "
          "| DT/vlmtag | peak RSS MB DT | vlmtag | vlmtag/DT | vlmtag vs limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, latency, slots, count, best in table:
        dt, vt = best.get("datatrove"), best.get("vlmtag")
        server = f"{latency:g} s, {slots} slots" if slots else "instant"

        def cell(run, fmt, key, scale=1.0):
            return format(run[key] * scale, fmt) if run else "—"

        def ratio(a, b, key):
            return f"{a[key] / b[key]:.2f}" if a and b else "—"

        cpu = 1000 / count
        limit = f"{vt['rate'] / (slots / latency):.2f}" if vt and slots else ""
        print(f"| {name} | {server} | {cell(dt, '.1f', 'rate')} | {cell(vt, '.1f', 'rate')} | {ratio(vt, dt, 'rate')} "
              f"| {cell(dt, '.2f', 'cpu', cpu)} | {cell(vt, '.2f', 'cpu', cpu)} | {ratio(dt, vt, 'cpu')} "
              f"| {cell(dt, '.0f', 'rss')} | {cell(vt, '.0f', 'rss')} | {ratio(vt, dt, 'rss')} | {limit} |")
    if failures:
        print(f"\n!!! {len(failures)} FAILED round(s) (left out of the table):")
        for f in failures:
            print(f"  - {f}")
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

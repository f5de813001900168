"""Input formats as users have them: img2dataset WebDataset shards, Hugging Face-style Parquet image columns,
folders of photos, globs of JSONL shards, remote (fsspec) paths; and the export as it comes back."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import PHOTO_NAMES
from vlmtag.io import open_dataset, open_writer
from vlmtag.io.dataset import BYTES_KEY, ShardReadError
from vlmtag.io.filesystem import RemoteUnavailable
from vlmtag.io.webdataset import CorruptTar, webdataset_rows
from vlmtag.rowkeys import INVALID_ROW_KEY

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CAPTIONS = {
    "astronaut": "an astronaut in a white suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat",
    "rocket": "a rocket on the launch pad",
}


def rows_of(path, batch_size=2) -> list[dict]:
    return [row for shard in open_dataset(str(path)) for batch in shard.batches(batch_size) for row in batch]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(path: Path, photo_dir: Path, names=PHOTO_NAMES, start: int = 0) -> list[str]:
    """A shard as img2dataset writes it: per sample KEY.jpg, KEY.json, KEY.txt (webdataset's sorted order)."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names, start):
            key = f"{i:09d}"
            keys.append(key)
            jpg = (photo_dir / f"{name}.jpg").read_bytes()
            meta = {"url": f"https://example.com/{name}.jpg", "caption": CAPTIONS[name], "key": key,
                    "status": "success", "error_message": None, "width": 512, "height": 512,
                    "original_width": 512, "original_height": 512, "exif": "{}", "sha256": None}
            add_member(tar, f"{key}.jpg", jpg)
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
            add_member(tar, f"{key}.txt", CAPTIONS[name].encode())
    return keys


@pytest.fixture()
def shard_dir(tmp_path, photo_dir) -> Path:
    """An img2dataset output folder: 00000.tar (4 samples) and 00001.tar (2), each with its metadata parquet
    and stats file beside it."""
    out = tmp_path / "img2dataset-out"
    out.mkdir()
    write_img2dataset_shard(out / "00000.tar", photo_dir)
    write_img2dataset_shard(out / "00001.tar", photo_dir, names=("coffee", "rocket"), start=10000)
    for n in ("00000", "00001"):
        pq.write_table(pa.table({"url": ["x"], "caption": ["x"], "status": ["success"]}), out / f"{n}.parquet")
        (out / f"{n}_stats.json").write_text("{}")
    return out


# ---------------------------------------------------------------------------------------------- WebDataset


def test_webdataset_shard_reads_one_row_per_sample_with_its_image_bytes(shard_dir, photo_dir):
    rows = rows_of(shard_dir / "00000.tar", batch_size=3)
    assert len(rows) == 4
    assert [r["images"] for r in rows] == [[f"00000.tar#{i:09d}.jpg"] for i in range(4)]
    for row, name in zip(rows, PHOTO_NAMES):
        assert row[BYTES_KEY] == [(photo_dir / f"{name}.jpg").read_bytes()]
        assert row["text"] == row["caption"] == CAPTIONS[name]
        assert row["url"] == f"https://example.com/{name}.jpg" and row["status"] == "success"
        assert row["width"] == 512
    batches = list(open_dataset(str(shard_dir / "00000.tar"))[0].batches(3))
    assert [len(b) for b in batches] == [3, 1]


def test_img2dataset_folder_is_its_tars_in_order(shard_dir):
    shards = open_dataset(str(shard_dir))
    assert [(s.name, s.kind) for s in shards] == [("00000.tar", "webdataset"), ("00001.tar", "webdataset")]
    rows = rows_of(shard_dir)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(4)] + ["000010000", "000010001"]
    assert rows[-1]["images"] == ["00001.tar#000010001.jpg"]


def test_webdataset_text_and_odd_samples(tmp_path, photo_dir):
    jpg = (photo_dir / "coffee.jpg").read_bytes()
    png = io.BytesIO()
    from PIL import Image

    Image.open(photo_dir / "chelsea.jpg").save(png, "PNG")
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.jpg", jpg)  # no txt: the json's caption becomes the text
        add_member(tar, "a.json", b'{"caption": "from json"}')
        add_member(tar, "b.jpg", jpg)  # the json's own text wins over the txt
        add_member(tar, "b.json", b'{"text": "own text"}')
        add_member(tar, "b.txt", b"from txt")
        add_member(tar, "c.json", b'{"caption": "failed download", "status": "failed_to_download"}')
        add_member(tar, "d.jpg", jpg)  # two images in one sample, plus a member of another kind
        add_member(tar, "d.cls", b"3")
        add_member(tar, "d.seg.png", png.getvalue())
        add_member(tar, "e.webp", jpg)
        add_member(tar, "e.json", b"{not json")
        add_member(tar, "sub/f.jpg", jpg)  # same stem, other folder: another sample
        add_member(tar, "f.jpg", jpg)
    rows = rows_of(path)
    assert [r.get("text") for r in rows] == ["from json", "own text", "failed download", None, None, None, None]
    assert [r["images"] for r in rows] == [
        ["odd.tar#a.jpg"], ["odd.tar#b.jpg"], [], ["odd.tar#d.jpg", "odd.tar#d.seg.png"], ["odd.tar#e.webp"],
        ["odd.tar#sub/f.jpg"], ["odd.tar#f.jpg"],
    ]
    assert BYTES_KEY not in rows[2] and rows[2]["status"] == "failed_to_download"
    assert rows[3][BYTES_KEY] == [jpg, png.getvalue()]
    assert rows[4][BYTES_KEY] == [jpg] and "invalid JSON" in rows[4]["__vlmtag_invalid_row__"]["error"]
    assert rows[4]["__vlmtag_invalid_row__"]["member"] == "odd.tar#e.json"


def test_gzipped_webdataset_shard(tmp_path, photo_dir):
    write_img2dataset_shard(tmp_path / "plain.tar", photo_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00000.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    rows = rows_of(tmp_path / "data")
    assert [r["images"] for r in rows] == [[f"00000.tar.gz#{i:09d}.jpg"] for i in range(4)]


def test_truncated_tar_keeps_the_whole_samples_then_names_the_member(tmp_path, photo_dir):
    write_img2dataset_shard(tmp_path / "full.tar", photo_dir)
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        third_jpg = tar.getmember("000000002.jpg")
    cut = tmp_path / "00007.tar"
    cut.write_bytes(data[: third_jpg.offset_data + 1000])  # cut inside the third sample's image
    got: list[dict] = []
    with pytest.raises(CorruptTar) as e:
        for row in webdataset_rows(str(cut)):
            got.append(row)
    assert [r["key"] for r in got] == ["000000000", "000000001"]
    assert isinstance(e.value, (ShardReadError, ValueError))
    assert "00007.tar" in str(e.value) and "000000002.jpg" in str(e.value)
    # As a dataset shard, the damage becomes one unreadable row after the whole samples, in whatever batches.
    rows = [r for batch in open_dataset(str(cut))[0].batches(1) for r in batch]
    assert [r.get("key") for r in rows] == ["000000000", "000000001", None]
    assert rows[2][INVALID_ROW_KEY]["shard"] == "00007.tar" and "000000002.jpg" in rows[2][INVALID_ROW_KEY]["error"]

    boundary = tmp_path / "00008.tar"  # cut exactly between two samples: no end-of-archive marker
    boundary.write_bytes(data[: third_jpg.offset])
    with pytest.raises(CorruptTar, match="00008.tar.*end-of-archive"):
        list(webdataset_rows(str(boundary)))

    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(CorruptTar, match="junk.tar"):
        list(webdataset_rows(str(tmp_path / "junk.tar")))


def test_tar_with_scattered_samples_is_refused_with_the_fix(tmp_path, photo_dir):
    # `tar -cf` stores files in directory order, so a sample's jpg/json/txt are not together.
    path = tmp_path / "scattered.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("000000001.jpg", "000000000.txt", "000000001.json", "000000000.jpg"):
            add_member(tar, name, b"x")
    with pytest.raises(CorruptTar, match=r"000000001.*not next to each other.*tar --sort=name"):
        list(webdataset_rows(str(path)))


# ------------------------------------------------------------------------------------- Parquet image bytes


def test_parquet_hf_image_column_gives_images_and_bytes(tmp_path, photo_dir):
    photos = {n: (photo_dir / f"{n}.jpg").read_bytes() for n in PHOTO_NAMES}
    table = pa.table({
        "image": pa.array([{"bytes": photos[n], "path": f"{n}.jpg"} for n in PHOTO_NAMES] + [None], IMAGE_STRUCT),
        "text": [CAPTIONS[n] for n in PHOTO_NAMES] + ["no image"],
        "id": list(range(5)),
    })
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=2)
    rows = rows_of(path, batch_size=2)
    assert [r["id"] for r in rows] == list(range(5))
    assert [r["images"] for r in rows] == [[f"{path.name}#{i}"] for i in range(4)] + [[]]
    for row, name in zip(rows, PHOTO_NAMES):
        assert row[BYTES_KEY] == [photos[name]]
        assert row["image"] == {"bytes": photos[name], "path": f"{name}.jpg"}  # the column stays as it was
    assert BYTES_KEY not in rows[4] and rows[4]["image"] is None


def test_parquet_list_of_images_and_path_only_structs(tmp_path, photo_dir):
    coffee, cat = (photo_dir / "coffee.jpg").read_bytes(), (photo_dir / "chelsea.jpg").read_bytes()
    table = pa.table({
        "photos": pa.array([[{"bytes": coffee, "path": None}, {"bytes": cat, "path": None}],
                            [],
                            [{"bytes": None, "path": "rocket.jpg"}]], pa.list_(IMAGE_STRUCT)),
    })
    pq.write_table(table, tmp_path / "multi.parquet")
    rows = rows_of(tmp_path / "multi.parquet")
    assert [r["images"] for r in rows] == [["multi.parquet#0/0", "multi.parquet#0/1"], [], ["rocket.jpg"]]
    assert rows[0][BYTES_KEY] == [coffee, cat] and rows[2][BYTES_KEY] == [None]


def test_parquet_with_its_own_images_column(tmp_path, photo_dir):
    coffee = (photo_dir / "coffee.jpg").read_bytes()
    # `images` already holds image structs: left as is, bytes attached alongside.
    pq.write_table(pa.table({"images": pa.array([[{"bytes": coffee, "path": "c.jpg"}]], pa.list_(IMAGE_STRUCT))}),
                   tmp_path / "own.parquet")
    [row] = rows_of(tmp_path / "own.parquet")
    assert row["images"] == [{"bytes": coffee, "path": "c.jpg"}] and row[BYTES_KEY] == [coffee]
    # `images` holds paths: the file says where its images are; the bytes column is not used.
    pq.write_table(pa.table({"images": [["a.jpg"]], "thumb": pa.array([{"bytes": coffee, "path": None}],
                                                                     IMAGE_STRUCT)}), tmp_path / "paths.parquet")
    [row] = rows_of(tmp_path / "paths.parquet")
    assert row["images"] == ["a.jpg"] and BYTES_KEY not in row


# ------------------------------------------------------------------------------------------ image folders


def test_folder_of_images_walks_recursively_in_sorted_order(tmp_path, photo_dir):
    root = tmp_path / "photos"
    for rel, name in [("b/2.jpg", "coffee"), ("b/1.JPG", "rocket"), ("a/deep/x.jpg", "chelsea"),
                      ("top.jpg", "astronaut"), ("a/z.jpeg", "coffee"), (".cache/hidden.jpg", "coffee"),
                      ("b/._1.jpg", "coffee")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "labels.csv").write_text("x")
    [shard] = open_dataset(str(root))
    assert shard.kind == "images" and shard.base_dir == str(root)
    rows = rows_of(root, batch_size=2)
    assert rows == [{"images": ["top.jpg"]}, {"images": ["a/z.jpeg"]}, {"images": ["a/deep/x.jpg"]},
                    {"images": ["b/1.JPG"]}, {"images": ["b/2.jpg"]}]


# ------------------------------------------------------------------------------------------ globs of JSONL


def test_glob_of_jsonl_shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in (2, 0, 1):
        (d / f"part-{i}.jsonl").write_text("".join(json.dumps({"id": f"{i}-{j}", "images": []}) + "\n"
                                                   for j in range(3)))
    (d / "README.md").write_text("not data")
    shards = open_dataset(str(d / "part-*.jsonl"))
    assert [s.name for s in shards] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert all(s.base_dir == str(d) for s in shards)
    assert [r["id"] for r in rows_of(d / "part-*.jsonl")] == [f"{i}-{j}" for i in range(3) for j in range(3)]
    assert [r["id"] for r in rows_of(d)] == [f"{i}-{j}" for i in range(3) for j in range(3)]  # the folder too
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_dataset(str(d / "nothing-*.jsonl"))


def test_a_path_with_glob_characters_that_exists_is_a_path(tmp_path):
    d = tmp_path / "photos [2023]"
    d.mkdir()
    (d / "a.jsonl").write_text('{"id": 1}\n')
    assert [r["id"] for r in rows_of(d / "a.jsonl")] == [1]


# ------------------------------------------------------------------------------------------ remote (fsspec)


@pytest.fixture()
def memory_root():
    fsspec = pytest.importorskip("fsspec")
    root = f"memory://vlmtag-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def put(url: str, data: bytes) -> None:
    import fsspec

    with fsspec.open(url, "wb") as f:
        f.write(data)


def test_remote_dataset_files_through_fsspec(memory_root, tmp_path, photo_dir):
    for i in range(3):
        put(f"{memory_root}/jsonl/part-{i}.jsonl", f'{{"id": {i}, "images": []}}\n'.encode())
    shards = open_dataset(f"{memory_root}/jsonl/*.jsonl")
    assert [s.name for s in shards] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert shards[0].base_dir.endswith("/jsonl") and shards[0].base_dir.startswith("memory://")
    assert [r["id"] for r in rows_of(f"{memory_root}/jsonl/*.jsonl")] == [0, 1, 2]
    assert [r["id"] for r in rows_of(f"{memory_root}/jsonl")] == [0, 1, 2]  # a remote folder of shards

    write_img2dataset_shard(tmp_path / "00000.tar", photo_dir)
    put(f"{memory_root}/wds/00000.tar", (tmp_path / "00000.tar").read_bytes())
    rows = rows_of(f"{memory_root}/wds/00000.tar")
    assert [r["images"] for r in rows] == [[f"00000.tar#{i:09d}.jpg"] for i in range(4)]
    assert rows[1][BYTES_KEY] == [(photo_dir / "coffee.jpg").read_bytes()]

    coffee = (photo_dir / "coffee.jpg").read_bytes()
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([{"bytes": coffee, "path": None}], IMAGE_STRUCT)}), buf)
    put(f"{memory_root}/hf/data.parquet", buf.getvalue())
    [row] = rows_of(f"{memory_root}/hf/data.parquet")
    assert row["images"] == ["data.parquet#0"] and row[BYTES_KEY] == [coffee]

    put(f"{memory_root}/photos/b/cat.jpg", (photo_dir / "chelsea.jpg").read_bytes())
    put(f"{memory_root}/photos/a.jpg", coffee)
    put(f"{memory_root}/photos/notes.txt", b"x")
    [shard] = open_dataset(f"{memory_root}/photos")
    assert shard.kind == "images"
    rows = rows_of(f"{memory_root}/photos")
    assert [r["images"] for r in rows] == [["a.jpg"], ["b/cat.jpg"]]
    assert rows[0][BYTES_KEY] == [coffee]  # read during the walk: the operator tags these bytes

    with pytest.raises(FileNotFoundError):
        open_dataset(f"{memory_root}/missing")


def test_remote_path_without_fsspec_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(RemoteUnavailable, match=r"pip install fsspec"):
        open_dataset("s3://bucket/data/*.jsonl")


# ---------------------------------------------------------------------------------------------- writers


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_writers_drop_the_image_bytes(tmp_path, shard_dir, ext):
    rows = rows_of(shard_dir / "00000.tar")
    out = tmp_path / f"out{ext}"
    with open_writer(str(out)) as w:
        w.write(rows[:3])
        w.write(rows[3:])
    if ext == ".jsonl":
        back = read_jsonl(out)
    elif ext == ".json":
        back = json.loads(out.read_text())
    else:
        back = pq.read_table(out).to_pylist()
    assert len(back) == 4
    assert all(BYTES_KEY not in r for r in back)
    assert back == [{k: v for k, v in r.items() if k != BYTES_KEY} for r in rows]
    assert all(BYTES_KEY in r for r in rows)  # the caller's rows are not changed


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_a_writer_block_that_raises_leaves_no_file(tmp_path, ext):
    out = tmp_path / f"out{ext}"
    out.write_text("the previous export\n")
    with pytest.raises(RuntimeError, match="boom"), open_writer(str(out)) as w:
        w.write([{"a": 1}])
        raise RuntimeError("boom")
    assert out.read_text() == "the previous export\n"  # left as it was
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # and no temporary file beside it
    w.commit()  # after an abort, commit does nothing
    assert out.read_text() == "the previous export\n"


# ------------------------------------------------------------------------------------------- end to end


def run_cli(tmp_path, dataset_path, export_path) -> None:
    from vlmtag.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset_path": str(dataset_path), "export_path": str(export_path),
        "process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}}],
    }))
    assert main(["-q", "run", "--config", str(recipe)]) == 0


EXPECTED = {"astronaut": "person", "coffee": "cup", "chelsea": "cat"}


def test_end_to_end_webdataset_shard(tmp_path, shard_dir):
    out = tmp_path / "tagged.jsonl"
    run_cli(tmp_path, shard_dir / "00000.tar", out)
    rows = read_jsonl(out)
    assert [r["images"] for r in rows] == [[f"00000.tar#{i:09d}.jpg"] for i in range(4)]
    for row, name in zip(rows, PHOTO_NAMES):
        assert BYTES_KEY not in row and row["text"] == CAPTIONS[name]
        meta = row["__dj__meta__"]
        assert meta["image_tags_errors"] == [None] and len(meta["image_tags"]) == 1 and meta["image_tags"][0]
        if name in EXPECTED:
            assert EXPECTED[name] in meta["image_tags"][0]


def test_end_to_end_parquet_image_bytes(tmp_path, photo_dir):
    photos = {n: (photo_dir / f"{n}.jpg").read_bytes() for n in PHOTO_NAMES}
    src = tmp_path / "hf.parquet"
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": photos[n], "path": f"{n}.jpg"} for n in PHOTO_NAMES], IMAGE_STRUCT),
        "text": [CAPTIONS[n] for n in PHOTO_NAMES],
    }), src, row_group_size=3)
    out = tmp_path / "tagged.parquet"
    run_cli(tmp_path, src, out)
    rows = pq.read_table(out).to_pylist()
    assert [r["images"] for r in rows] == [[f"hf.parquet#{i}"] for i in range(4)]
    for row, name in zip(rows, PHOTO_NAMES):
        assert BYTES_KEY not in row and row["image"] == {"bytes": photos[name], "path": f"{name}.jpg"}
        meta = row["__dj__meta__"]
        assert meta["image_tags_errors"] == [None] and meta["image_tags"][0]
        if name in EXPECTED:
            assert EXPECTED[name] in meta["image_tags"][0]


def test_end_to_end_remote_webdataset_shard(tmp_path, photo_dir, memory_root):
    write_img2dataset_shard(tmp_path / "00000.tar", photo_dir)
    put(f"{memory_root}/wds/00000.tar", (tmp_path / "00000.tar").read_bytes())
    out = tmp_path / "tagged.jsonl"
    run_cli(tmp_path, f"{memory_root}/wds/00000.tar", out)
    rows = read_jsonl(out)
    assert [r["images"] for r in rows] == [[f"00000.tar#{i:09d}.jpg"] for i in range(4)]
    assert "cup" in rows[1]["__dj__meta__"]["image_tags"][0]
    assert all(r["__dj__meta__"]["image_tags_errors"] == [None] for r in rows)


def test_relative_image_paths_in_a_remote_jsonl_are_read_from_beside_it(tmp_path, photo_dir, memory_root):
    put(f"{memory_root}/data/images/coffee.jpg", (photo_dir / "coffee.jpg").read_bytes())
    put(f"{memory_root}/cats/chelsea.jpg", (photo_dir / "chelsea.jpg").read_bytes())
    rows_in = [
        {"id": 0, "images": ["images/coffee.jpg"]},
        {"id": 1, "images": ["./../cats/chelsea.jpg"]},
        {"id": 2, "images": ["images/missing.jpg", "../../../outside.jpg"]},
    ]
    put(f"{memory_root}/data/rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows_in).encode())
    out = tmp_path / "tagged.jsonl"
    run_cli(tmp_path, f"{memory_root}/data/rows.jsonl", out)
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in rows] == rows_in  # paths as written
    assert "cup" in rows[0]["__dj__meta__"]["image_tags"][0]
    assert "cat" in rows[1]["__dj__meta__"]["image_tags"][0]
    assert rows[2]["__dj__meta__"]["image_tags"] == [[], []]
    assert rows[2]["__dj__meta__"]["image_tags_errors"] == [
        f"file not found: {memory_root}/data/images/missing.jpg",
        "path leaves the dataset's storage: ../../../outside.jpg",
    ]

"""The operator with a controlled vocabulary: normalise → map → drop duplicates → first max_tags, per policy."""

from __future__ import annotations

import pytest

from openai_server import OpenAIServer, Reply
from vlmtag import ImageTaggingVLMMapper
from vlmtag.errors import ConfigError


@pytest.fixture
def server():
    with OpenAIServer() as s:
        s.behaviour = lambda body, attempt: Reply.tags(["Cats", "sofa", "cat", "red_ball", "zzq-unknown", "Dog"])
        yield s


@pytest.fixture
def vocab_files(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# my terms\ncat\ncouch\nball\ndog\n")
    syn = tmp_path / "syn.txt"
    syn.write_text("couch: sofa, settee\nball: red-ball\n")
    return str(terms), str(syn)


def tag(server, photo_dir, **kw):
    op = ImageTaggingVLMMapper("m", is_api_model=True, model_params={"base_url": server.base_url},
                               vocabulary_embeddings=False, **kw)
    try:
        return op.process_rows([{"images": ["coffee.jpg", "chelsea.jpg"]}], base_dir=str(photo_dir))[0]["__dj__meta__"]
    finally:
        op.close()


def test_mapping_keeps_model_order_and_drops_duplicates(server, photo_dir, vocab_files):
    terms, syn = vocab_files
    meta = tag(server, photo_dir, vocabulary=terms, synonyms=syn)
    # Cats→cat (plural fold), sofa→couch (synonym), cat (a duplicate after mapping), red_ball→ball, unknown kept, Dog→dog
    assert meta["image_tags"] == [["cat", "couch", "ball", "zzq-unknown", "dog"]] * 2
    assert "image_tags_unmapped" not in meta


def test_policies_drop_and_separate(server, photo_dir, vocab_files):
    terms, syn = vocab_files
    dropped = tag(server, photo_dir, vocabulary=terms, synonyms=syn, unmapped="drop")
    assert dropped["image_tags"][0] == ["cat", "couch", "ball", "dog"]
    apart = tag(server, photo_dir, vocabulary=terms, synonyms=syn, unmapped="separate", max_tags=2)
    assert apart["image_tags"] == [["cat", "couch"]] * 2
    assert apart["image_tags_unmapped"] == [["zzq-unknown"]] * 2


def test_max_tags_is_applied_after_mapping(server, photo_dir, vocab_files):
    terms, syn = vocab_files
    # without a vocabulary the first 3 answers are Cats, sofa, cat; mapped, cat merges into cat
    meta = tag(server, photo_dir, vocabulary=terms, synonyms=syn, max_tags=3)
    assert meta["image_tags"][0] == ["cat", "couch", "ball"]


def test_structured_output_can_be_limited_to_the_vocabulary(server, photo_dir, vocab_files):
    terms, _ = vocab_files
    tag(server, photo_dir, vocabulary=terms, json_schema=True, constrain_to_vocabulary=True)
    items = server.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["tags"]["items"]
    assert items == {"type": "string", "enum": ["cat", "couch", "ball", "dog"]}


def test_vocabulary_errors_fail_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="vocabulary"):
        ImageTaggingVLMMapper("builtin:default", vocabulary=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="need a vocabulary"):
        ImageTaggingVLMMapper("builtin:default", synonyms="x.txt")


def test_builtin_vocabulary_with_the_embedded_model(photo_dir):
    op = ImageTaggingVLMMapper("builtin:default", vocabulary="builtin:coco-imagenet", unmapped="separate",
                               vocabulary_embeddings=False)
    try:
        meta = op.process_rows([{"images": ["coffee.jpg"]}], base_dir=str(photo_dir))[0]["__dj__meta__"]
    finally:
        op.close()
    assert {"cup", "espresso"} <= set(meta["image_tags"][0])
    assert meta["image_tags_unmapped"] == [[]]

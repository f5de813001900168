"""`vlmtag eval`: scores checked against a hand-computed example, what is left out, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtag.cli import main
from vlmtag.errors import ConfigError
from vlmtag.evaluate import Scores, evaluate
from vlmtag.tags.normalize import normalize_tag
from vlmtag.tags.vocabulary import Vocabulary

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GOLD = [
    {"images": ["a.jpg"], "labels": [["cat", "dog"]]},
    {"images": ["b.jpg", "c.jpg"], "labels": [["car"], ["Cat", "tree"]]},
    {"images": ["d.jpg"], "labels": [["bus"]]},
    {"images": ["e.jpg"], "labels": [["sky"]]},  # never predicted
    {"images": [], "labels": []},
]


def export_row(images, tags, errors=None):
    errors = errors if errors is not None else [None] * len(images)
    return {"images": images, "text": "x", "__dj__meta__": {"image_tags": tags, "image_tags_errors": errors}}


PRED = [
    export_row(["a.jpg", "b.jpg"], [["Cat", "dog "], ["car", "road", "street"]]),
    export_row(["c.jpg", "d.jpg"], [["cat", "car"], []], [None, "timeout after 3 tries"]),  # d.jpg failed
    export_row([], [[]]),  # a row without images
    export_row(["x.jpg"], [["cat"]]),  # no gold labels for x.jpg
    {"images": ["a.jpg"], "text": "never tagged"},  # no tag list: left out
]

# Hand computation over the three scored images (a, b, c; d failed, x has no gold, the last a has no tags):
#   a: pred {cat, dog}         gold {cat, dog}   -> cat tp, dog tp
#   b: pred {car, road, street} gold {car}       -> car tp, road fp, street fp
#   c: pred {cat, car}         gold {cat, tree}  -> cat tp, car fp, tree fn
# Per tag: cat tp 2 | dog tp 1 | car tp 1 fp 1 | road fp 1 | street fp 1 | tree fn 1
# micro: tp 4, fp 3, fn 1 -> P = 4/7 = 0.5714, R = 4/5 = 0.8, F1 = 2 * (4/7) * (4/5) / (4/7 + 4/5) = 2/3
# macro over the 6 tags (0/0 counts as 0):
#   P_t: cat 1, dog 1, car 1/2, road 0, street 0, tree 0/0 = 0  -> (2.5) / 6 = 5/12 = 0.4167
#   R_t: cat 1, dog 1, car 1,   road 0/0 = 0, street 0, tree 0  -> 3 / 6 = 0.5
#   F1_t: cat 1, dog 1, car 2 * 0.5 * 1 / 1.5 = 2/3, others 0 -> (8/3) / 6 = 4/9 = 0.4444
MICRO = {"tp": 4, "fp": 3, "fn": 1, "precision": 4 / 7, "recall": 4 / 5, "f1": 2 / 3}
MACRO = {"precision": 5 / 12, "recall": 1 / 2, "f1": 4 / 9, "tags": 6}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "pred.jsonl", PRED), write_jsonl(tmp_path / "gold.jsonl", GOLD)


def test_scores_match_the_hand_computed_example(files):
    result = evaluate(str(files[0]), str(files[1]))
    micro = result.scores.micro.as_dict()
    assert micro == pytest.approx(MICRO)
    assert result.scores.macro == pytest.approx(MACRO)
    table = [(tag, s.tp, s.fp, s.fn) for tag, s in result.scores.table()]
    # most errors first (fp + fn), then most true positives, then by name
    assert table == [("car", 1, 1, 0), ("road", 0, 1, 0), ("street", 0, 1, 0), ("tree", 0, 0, 1),
                     ("cat", 2, 0, 0), ("dog", 1, 0, 0)]


def test_failed_and_unmatched_images_are_left_out_and_counted(files):
    counts = evaluate(str(files[0]), str(files[1])).counts
    assert counts == {
        "pred_rows": 5, "pred_rows_without_images": 1, "pred_rows_unreadable": 0, "pred_images": 6,
        "scored_images": 3, "failed_images": 1, "untagged_images": 1, "pred_images_not_in_gold": 1,
        "gold_images": 5, "gold_images_not_in_pred": 1, "gold_rows_without_images": 1, "gold_failed_images": 0,
        "failures_by_reason": {"timeout after 3 tries": 1},
    }


def test_scores_of_sets_directly():
    s = Scores()
    s.add({"cat"}, {"cat", "dog"})
    s.add(set(), set())  # an image with nothing on either side changes no tag
    assert s.micro.as_dict() == pytest.approx({"tp": 1, "fp": 0, "fn": 1, "precision": 1.0, "recall": 0.5,
                                               "f1": 2 / 3})
    assert s.macro == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "tags": 2})
    assert Scores().macro == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tags": 0}


def test_a_vocabulary_maps_both_sides(tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", [export_row(["a.jpg"], [["cats", "kitty", "sofa"]])])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"images": ["a.jpg"], "labels": [["Cat", "couch"]]}])
    plain = evaluate(str(pred), str(gold)).scores.micro
    assert (plain.tp, plain.fp, plain.fn) == (0, 3, 2)
    vocab = Vocabulary(["cat", "couch"], {"kitty": "cat"}, use_embeddings=False)
    mapped = evaluate(str(pred), str(gold), vocabulary=vocab).scores
    # cats -> cat, kitty -> cat (one tag), sofa is unmapped and kept, so it still counts against precision
    assert mapped.micro.as_dict() == pytest.approx({"tp": 1, "fp": 1, "fn": 1, "precision": 0.5, "recall": 0.5,
                                                    "f1": 0.5})


def test_gold_in_the_export_layout(tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", [export_row(["a.jpg", "b.jpg"], [["cat"], ["dog"]])])
    gold = write_jsonl(tmp_path / "g.jsonl", [export_row(["a.jpg", "b.jpg"], [["cat"], ["x"]], [None, "bad"])])
    result = evaluate(str(pred), str(gold))
    assert result.counts["scored_images"] == 1 and result.counts["gold_failed_images"] == 1
    assert result.scores.micro.f1 == 1.0


@pytest.mark.parametrize("gold_rows,message", [
    ([{"images": ["a.jpg", "b.jpg"], "labels": [["cat"]]}], "row 1: expected 'labels' with one label list per"),
    ([{"labels": [["cat"]]}], "row 1: no 'images' list"),
    ([{"images": ["a.jpg"], "labels": [["cat"]]}, {"images": ["a.jpg"], "labels": [["dog"]]}],
     "row 2: 'a.jpg' has other labels than in row 1"),
    ([{"images": [], "labels": []}], "no labelled images"),
])
def test_gold_mistakes(tmp_path, files, gold_rows, message):
    gold = write_jsonl(tmp_path / "bad.jsonl", gold_rows)
    with pytest.raises(ConfigError, match=message):
        evaluate(str(files[0]), str(gold))


def test_cli_prints_scores_and_writes_json(files, tmp_path, capsys):
    out = tmp_path / "scores" / "eval.json"
    assert main(["eval", "--pred", str(files[0]), "--gold", str(files[1]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scored 3 of 6 predicted images" in printed
    for number in ("0.5714", "0.8000", "0.6667", "0.4167", "0.5000", "0.4444"):
        assert number in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["micro"] == pytest.approx(MICRO)
    assert data["macro"] == pytest.approx(MACRO)
    assert data["per_tag"][0] == pytest.approx({"tag": "car", "tp": 1, "fp": 1, "fn": 0, "precision": 0.5,
                                                "recall": 1.0, "f1": 2 / 3})
    assert data["counts"]["failed_images"] == 1


def test_cli_user_errors_exit_2_with_one_line(files, tmp_path, capsys):
    assert main(["eval", "--pred", str(tmp_path / "nope.jsonl"), "--gold", str(files[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmtag: error: --pred") and "file not found" in err and err.count("\n") == 1
    assert main(["eval", "--pred", str(files[0]), "--gold", str(files[1]), "--synonyms", "s.txt"]) == 2
    assert "--synonyms needs --vocabulary" in capsys.readouterr().err


def test_shipped_gold_labels_cover_the_demo_photos():
    """examples/gold.jsonl labels every photo of examples/demo.jsonl, 5-10 normalised labels each."""
    demo = [json.loads(line) for line in (EXAMPLES / "demo.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = [json.loads(line) for line in (EXAMPLES / "gold.jsonl").read_text(encoding="utf-8").splitlines()]
    labelled = {img: labels for row in gold for img, labels in zip(row["images"], row["labels"])}
    assert labelled.keys() == {img for row in demo for img in row["images"]}
    for img, labels in labelled.items():
        assert (EXAMPLES / img).is_file()
        assert 5 <= len(labels) <= 10
        assert labels == [normalize_tag(t) for t in labels] and len(set(labels)) == len(labels)


def test_eval_runs_on_the_demo_layout(tmp_path, capsys):
    """An export of examples/demo.jsonl whose tags are the gold labels scores 1.0 everywhere."""
    gold_path = EXAMPLES / "gold.jsonl"
    labelled = {img: labels for line in gold_path.read_text(encoding="utf-8").splitlines()
                for row in [json.loads(line)] for img, labels in zip(row["images"], row["labels"])}
    rows = [json.loads(line) for line in (EXAMPLES / "demo.jsonl").read_text(encoding="utf-8").splitlines()]
    pred = write_jsonl(tmp_path / "demo-tagged.jsonl",
                       [export_row(r["images"], [labelled[i] for i in r["images"]] or [[]]) for r in rows])
    out = tmp_path / "eval.json"
    assert main(["eval", "--pred", str(pred), "--gold", str(gold_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["counts"]["scored_images"] == 9 and data["counts"]["pred_rows_without_images"] == 1
    assert data["micro"]["f1"] == data["macro"]["f1"] == 1.0

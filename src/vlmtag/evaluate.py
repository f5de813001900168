"""Score an export's tags against hand-written labels (`vlmtag eval`).

Inputs
    The predictions are an export (JSONL, JSON array or Parquet): rows with `images` and, aligned with them,
    `__dj__meta__[<field>]` (tag lists) and `__dj__meta__[<field>_errors]` (null, or why the image failed).
    The gold file has rows `{"images": [...], "labels": [[...], ...]}` (labels aligned with images), or the
    export layout (labels under `__dj__meta__[<field>]`; a gold image with an error there is skipped).

Matching
    Image by image, through the image path exactly as written in the rows (both files describe the same
    dataset). Every image entry of the predictions is one item: an image that appears three times in the
    dataset counts three times, as it does in the data. A path may appear several times in the gold file only
    with the same labels.

What is scored
    Tags and labels are normalised (`normalize_tag`) and, when a vocabulary is given, mapped onto it the same
    way (unmapped ones are kept as they are, so they still count), then compared as sets per image.
    Left out of the scores, and counted: images whose prediction failed (error not null), images with no tag
    list, predicted images that have no gold labels, and rows without images. Gold images that never occur
    in the predictions are counted too.

Scores
    For each tag t over the scored images: tp_t = images where t is predicted and in gold, fp_t = predicted
    but not in gold, fn_t = in gold but not predicted.

    - micro: P = Σtp / (Σtp + Σfp), R = Σtp / (Σtp + Σfn), F1 = 2PR / (P + R).
    - macro: the unweighted mean over T, the tags that occur in the gold labels or the predictions of the
      scored images (so tp_t + fp_t + fn_t > 0 for each), of P_t = tp_t / (tp_t + fp_t),
      R_t = tp_t / (tp_t + fn_t) and F1_t = 2 P_t R_t / (P_t + R_t). Macro F1 is the mean of the F1_t, not the
      harmonic mean of macro P and R.

    A 0/0 counts as 0 everywhere: a tag never predicted has P_t = 0, a tag never in gold has R_t = 0 (each
    such tag is entirely wrong, so it pulls the macro average down), F1 is 0 when P + R = 0, and with no
    scored tags at all every score is 0.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from vlmtag.errors import ConfigError
from vlmtag.rowkeys import META_KEY, error_field
from vlmtag.tags.normalize import normalize_tag

GOLD_LABELS_KEY = "labels"
_READ_BATCH = 1000

Mapper = Callable[[list[list[str]]], list[list[str]]]


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class TagScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision, "recall": self.recall,
                "f1": self.f1}


@dataclass
class Scores:
    per_tag: dict[str, TagScore] = field(default_factory=dict)
    images: int = 0

    def add(self, predicted: Iterable[str], gold: Iterable[str]) -> None:
        """Count one image: `predicted` and `gold` as sets of (already normalised) tags."""
        p, g = set(predicted), set(gold)
        self.images += 1
        for t in p | g:
            s = self.per_tag.setdefault(t, TagScore())
            if t in p and t in g:
                s.tp += 1
            elif t in p:
                s.fp += 1
            else:
                s.fn += 1

    @property
    def micro(self) -> TagScore:
        total = TagScore()
        for s in self.per_tag.values():
            total.tp += s.tp
            total.fp += s.fp
            total.fn += s.fn
        return total

    @property
    def macro(self) -> dict[str, float]:
        n = len(self.per_tag)
        if not n:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tags": 0}
        scores = self.per_tag.values()
        return {"precision": sum(s.precision for s in scores) / n, "recall": sum(s.recall for s in scores) / n,
                "f1": sum(s.f1 for s in scores) / n, "tags": n}

    def table(self) -> list[tuple[str, TagScore]]:
        """Per-tag scores, the most errors (fp + fn) first, then the most true positives, then by name."""
        return sorted(self.per_tag.items(), key=lambda kv: (-(kv[1].fp + kv[1].fn), -kv[1].tp, kv[0]))


@dataclass
class Evaluation:
    scores: Scores
    counts: dict[str, Any]
    settings: dict[str, Any]
    # One predicted path with no gold labels and one gold path, for a hint when nothing matched.
    unmatched_example: tuple[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        micro = self.scores.micro
        return {
            **self.settings,
            "counts": self.counts,
            "micro": micro.as_dict(),
            "macro": self.scores.macro,
            "per_tag": [{"tag": t, **s.as_dict()} for t, s in self.scores.table()],
        }


def _rows(path: str, what: str) -> Iterator[tuple[int, dict]]:
    from vlmtag.io.exports import iter_export_rows

    if not os.path.exists(path):
        raise ConfigError(f"--{what} {path}: file not found")
    try:
        for n, row in enumerate(iter_export_rows(path), 1):
            yield n, row
    except ConfigError as e:
        raise ConfigError(f"--{what} {e}") from None
    except (OSError, ValueError) as e:  # UnsupportedFormat is a ValueError; so are broken JSON arrays
        raise ConfigError(f"--{what} {path}: cannot read it: {e}") from None


def _tag_list(value: Any) -> list[str] | None:
    """A tag list as strings; None when `value` is not a list (numpy arrays from Parquet count as lists)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    return [t for t in value if isinstance(t, str)]


def _as_list(value: Any) -> list | None:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def make_mapper(vocabulary=None) -> Mapper:
    """Normalise each tag list (dropping empties and duplicates); map onto `vocabulary` if given, keeping
    unmapped tags."""

    def normalise(lists: list[list[str]]) -> list[list[str]]:
        out = []
        for tags in lists:
            seen = dict.fromkeys(t for t in map(normalize_tag, tags) if t)
            out.append(list(seen))
        return out

    if vocabulary is None:
        return normalise
    return lambda lists: [kept for kept, _ in vocabulary.map_tag_lists(normalise(lists), "keep")]


def load_gold(path: str, field: str = "image_tags", mapper: Mapper | None = None) -> tuple[dict[str, frozenset],
                                                                                            dict[str, int]]:
    """`{image path: label set}` from a gold file, and counts (rows, images, skipped)."""
    mapper = mapper or make_mapper()
    gold: dict[str, frozenset] = {}
    first_row: dict[str, int] = {}
    counts = collections.Counter()
    for n, row in _rows(path, "gold"):
        counts["rows"] += 1
        images = _as_list(row.get("images"))
        if images is None:
            raise ConfigError(f"--gold {path}: row {n}: no 'images' list")
        if not images:
            counts["rows_without_images"] += 1
            continue
        meta = row.get(META_KEY) if isinstance(row.get(META_KEY), dict) else {}
        if GOLD_LABELS_KEY in row:
            labels, errors = _as_list(row[GOLD_LABELS_KEY]), None
            where = f"'{GOLD_LABELS_KEY}'"
        else:
            labels, errors = _as_list(meta.get(field)), _as_list(meta.get(error_field(field)))
            where = f"'{GOLD_LABELS_KEY}' (or '{META_KEY}.{field}')"
        if labels is None or len(labels) != len(images):
            got = "none" if labels is None else f"{len(labels)} lists"
            raise ConfigError(f"--gold {path}: row {n}: expected {where} with one label list per image "
                              f"({len(images)}), got {got}")
        lists = []
        for i, (image, labs) in enumerate(zip(images, labels)):
            tags = _tag_list(labs)
            if not isinstance(image, str) or tags is None:
                raise ConfigError(f"--gold {path}: row {n}, image {i + 1}: expected a path and a list of labels")
            lists.append(tags)
        for image, labs, err, mapped in zip(images, labels, errors or [None] * len(images), mapper(lists)):
            if err is not None:
                counts["failed_images"] += 1
                continue
            counts["images"] += 1
            label_set = frozenset(mapped)
            if image in gold and gold[image] != label_set:
                raise ConfigError(f"--gold {path}: row {n}: {image!r} has other labels than in row "
                                  f"{first_row[image]}")
            gold[image] = label_set
            first_row.setdefault(image, n)
    if not gold:
        raise ConfigError(f"--gold {path}: no labelled images in it")
    return gold, dict(counts)


def evaluate(pred: str, gold_path: str, *, field: str = "image_tags", vocabulary=None) -> Evaluation:
    """Score the export `pred` against `gold_path` (see the module docstring for every rule)."""
    if not field:
        raise ConfigError("--field: expected a tag field name")
    mapper = make_mapper(vocabulary)
    gold, gold_counts = load_gold(gold_path, field, mapper)
    scores = Scores()
    counts = collections.Counter()
    failures: collections.Counter = collections.Counter()
    seen_gold: set[str] = set()
    errors_key = error_field(field)
    pending: list[tuple[str, list[str]]] = []
    unmatched: tuple[str, str] | None = None

    def flush() -> None:
        for (image, _), tags in zip(pending, mapper([t for _, t in pending])):
            scores.add(tags, gold[image])
        pending.clear()

    for _, row in _rows(pred, "pred"):
        counts["rows"] += 1
        images = _as_list(row.get("images"))
        if images is None:
            counts["rows_unreadable"] += 1
            continue
        if not images:
            counts["rows_without_images"] += 1
            continue
        meta = row.get(META_KEY) if isinstance(row.get(META_KEY), dict) else {}
        tag_lists = _as_list(meta.get(field))
        errors = _as_list(meta.get(errors_key))
        if tag_lists is not None and len(tag_lists) != len(images):
            tag_lists = None  # not aligned: no image of this row can be trusted
        if errors is not None and len(errors) != len(images):
            errors = None
        for i, image in enumerate(images):
            counts["images"] += 1
            key = image if isinstance(image, str) else None
            if key in gold:
                seen_gold.add(key)
            error = errors[i] if errors is not None else None
            tags = _tag_list(tag_lists[i]) if tag_lists is not None else None
            if error is not None:
                counts["failed_images"] += 1
                failures[str(error)] += 1
            elif tags is None:
                counts["untagged_images"] += 1
            elif key not in gold:
                counts["images_not_in_gold"] += 1
                if unmatched is None and key is not None:
                    unmatched = (key, next(iter(gold)))
            else:
                counts["scored_images"] += 1
                pending.append((key, tags))
                if len(pending) >= _READ_BATCH:
                    flush()
    flush()
    out_counts: dict[str, Any] = {
        "pred_rows": counts["rows"],
        "pred_rows_without_images": counts["rows_without_images"],
        "pred_rows_unreadable": counts["rows_unreadable"],
        "pred_images": counts["images"],
        "scored_images": counts["scored_images"],
        "failed_images": counts["failed_images"],
        "untagged_images": counts["untagged_images"],
        "pred_images_not_in_gold": counts["images_not_in_gold"],
        "gold_images": len(gold),
        "gold_images_not_in_pred": len(gold) - len(seen_gold),
        "gold_rows_without_images": gold_counts.get("rows_without_images", 0),
        "gold_failed_images": gold_counts.get("failed_images", 0),
        "failures_by_reason": dict(failures.most_common()),
    }
    settings = {"pred": pred, "gold": gold_path, "field": field,
                "vocabulary": getattr(vocabulary, "name", None)}
    return Evaluation(scores, out_counts, settings, unmatched)


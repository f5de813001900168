"""`vlmtag eval --pred EXPORT --gold GOLD`: precision, recall and F1 of the tags against hand labels."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from vlmtag.atomic import write_text
from vlmtag.errors import ConfigError
from vlmtag.rowkeys import META_KEY

if TYPE_CHECKING:
    from rich.console import Console


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score an export's tags against hand-written labels",
                       description="Score an export's tags against hand-written labels: micro and macro "
                                   "precision, recall and F1, and a per-tag table (most errors first).")
    p.add_argument("--pred", required=True, metavar="EXPORT", help="the export to score (.jsonl/.json/.parquet)")
    p.add_argument("--gold", required=True, metavar="GOLD",
                   help='labels: JSONL of {"images": [...], "labels": [[...], ...]}, or an export')
    p.add_argument("--field", default="image_tags", help="the tag field under __dj__meta__ (default: image_tags)")
    p.add_argument("--vocabulary", metavar="PATH", help="map tags and labels onto this vocabulary first "
                   "(a file, or builtin:coco-imagenet); unmapped ones are kept")
    p.add_argument("--synonyms", metavar="PATH", help="synonyms file for --vocabulary ('term: syn, syn' lines)")
    p.add_argument("--embedding-threshold", type=float, metavar="X",
                   help="cosine similarity needed by the vocabulary's embedding step (default 0.8)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="map with exact/synonym/plural rules only (no sentence-embedding model)")
    p.add_argument("--top", type=int, default=25, metavar="N",
                   help="rows of the per-tag table to print (0 = all; --json always has all)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the scores as JSON here")


def _vocabulary(args: argparse.Namespace):
    if args.vocabulary is None:
        if args.synonyms is not None:
            raise ConfigError("--synonyms needs --vocabulary")
        return None
    from vlmtag.tags.vocabulary import DEFAULT_EMBEDDING_THRESHOLD, Vocabulary

    threshold = DEFAULT_EMBEDDING_THRESHOLD if args.embedding_threshold is None else args.embedding_threshold
    return Vocabulary.from_files(args.vocabulary, args.synonyms, embedding_threshold=threshold,
                                 use_embeddings=not args.no_embeddings)


def _f(x: float) -> str:
    return f"{x:.4f}"


def render(result, console: Console, top: int = 25) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    c = result.counts
    micro, macro = result.scores.micro, result.scores.macro
    vocabulary = result.settings["vocabulary"]
    console.print(f"[bold]vlmtag eval[/] {escape(result.settings['pred'])} against "
                  f"{escape(result.settings['gold'])}" + (f" (vocabulary {escape(vocabulary)})" if vocabulary else ""),
                  highlight=False)
    console.print(
        f"scored {c['scored_images']} of {c['pred_images']} predicted images; left out: "
        f"{c['failed_images']} failed, {c['untagged_images']} without tags, "
        f"{c['pred_images_not_in_gold']} not in gold; {c['pred_rows_without_images']} rows without images; "
        f"{c['gold_images_not_in_pred']} of {c['gold_images']} gold images not in pred"
    )
    for reason, n in list(c["failures_by_reason"].items())[:5]:
        console.print(f"  failed ({n}): {reason}", markup=False, highlight=False)
    if c["untagged_images"] and not c["scored_images"]:
        console.print(f"[yellow]no tag lists under {escape(META_KEY)}.{escape(result.settings['field'])}[/] "
                      "in the predictions: is --field right?", highlight=False)
    if result.unmatched_example and not c["scored_images"]:
        pred_path, gold_path = result.unmatched_example
        console.print(f"[yellow]no predicted image has gold labels[/]: paths must match as written "
                      f"(pred has {escape(repr(pred_path))}, gold has {escape(repr(gold_path))})", highlight=False)

    summary = Table(title="Scores", title_justify="left")
    for col in ("", "precision", "recall", "F1"):
        summary.add_column(col, justify="right" if col else "left")
    summary.add_row(f"micro (tp {micro.tp}, fp {micro.fp}, fn {micro.fn})", _f(micro.precision),
                    _f(micro.recall), _f(micro.f1))
    summary.add_row(f"macro ({macro['tags']} tags)", _f(macro["precision"]), _f(macro["recall"]),
                    _f(macro["f1"]))
    console.print(summary)

    rows = result.scores.table()
    shown = rows if top <= 0 else rows[:top]
    per_tag = Table(title=f"Per tag, most errors first ({len(shown)} of {len(rows)})", title_justify="left")
    per_tag.add_column("tag", overflow="fold")
    for col in ("tp", "fp", "fn", "P", "R", "F1"):
        per_tag.add_column(col, justify="right")
    for tag, s in shown:
        per_tag.add_row(Text(tag), str(s.tp), str(s.fp), str(s.fn), _f(s.precision), _f(s.recall), _f(s.f1))
    console.print(per_tag)


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.errors import EXIT_OK
    from vlmtag.evaluate import evaluate

    if args.top < 0:
        raise ConfigError(f"--top={args.top}: expected a number ≥ 0")
    if args.embedding_threshold is not None and not 0 < args.embedding_threshold <= 1:
        raise ConfigError(f"--embedding-threshold={args.embedding_threshold}: expected a number in (0, 1]")
    result = evaluate(args.pred, args.gold, field=args.field, vocabulary=_vocabulary(args))
    render(result, console, args.top)
    if args.json_path:
        try:
            write_text(args.json_path, json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise ConfigError(f"--json {args.json_path}: cannot write it: {e.strerror or e}") from None
        console.print(f"scores written to {args.json_path}", highlight=False)
    return EXIT_OK

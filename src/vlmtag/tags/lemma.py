"""Singular/plural and simple lemma folding for English tags: a small rule set that proposes candidates.

`fold_candidates(tag)` returns the forms a tag may be an inflection of, most likely first ("puppies" →
["puppy", "puppie"], "running" → ["runn", "run", "runne"]). The rules over-generate on purpose: a caller keeps
only a candidate that is a known term (see `vlmtag.tags.vocabulary`), so a wrong guess such as "runn" costs
nothing, while a missing rule loses a match. Only the last word of a hyphenated tag is folded
("hot-dogs" → "hot-dog"), since in English noun phrases the head is last.

What is covered: regular plurals (-s, -es after s/x/z/ch/sh, -ies, -oes, -ves), -men compounds ("firemen"),
a table of irregular plurals (women, children, people, feet, teeth, mice, ...), Latin plurals (cacti, fungi),
verb forms in -ing and -ed with doubled consonants or a dropped e ("running", "making", "stopped", "baked"),
and a few irregular verbs (lying, ran, flew). Words that are not plain ASCII letters are left alone.
"""

from __future__ import annotations

IRREGULAR: dict[str, tuple[str, ...]] = {
    # nouns
    "men": ("man",), "women": ("woman",), "children": ("child",), "people": ("person",), "persons": ("person",),
    "feet": ("foot",), "teeth": ("tooth",), "geese": ("goose",), "mice": ("mouse",), "lice": ("louse",),
    "oxen": ("ox",), "dice": ("die",), "knives": ("knife",), "wives": ("wife",), "lives": ("life",),
    "leaves": ("leaf",), "loaves": ("loaf",), "thieves": ("thief",), "halves": ("half",), "calves": ("calf",),
    "wolves": ("wolf",), "shelves": ("shelf",), "scarves": ("scarf",), "hooves": ("hoof",),
    "cacti": ("cactus",), "fungi": ("fungus",), "octopi": ("octopus",), "radii": ("radius",),
    "indices": ("index",), "matrices": ("matrix",), "vertices": ("vertex",), "criteria": ("criterion",),
    "phenomena": ("phenomenon",), "bacteria": ("bacterium",), "larvae": ("larva",), "antennae": ("antenna",),
    "buses": ("bus",), "gases": ("gas",), "lenses": ("lens",), "pence": ("penny",),
    # verbs
    "lying": ("lie",), "dying": ("die",), "tying": ("tie",), "ran": ("run",), "sat": ("sit",),
    "ate": ("eat",), "flew": ("fly",), "flying": ("fly",), "swam": ("swim",), "drove": ("drive",),
    "rode": ("ride",), "wore": ("wear",), "stood": ("stand",), "sang": ("sing",), "slept": ("sleep",),
}

_VOWELS = frozenset("aeiou")
# Endings of singular words that a lone trailing "s" must not be stripped from (glass, bus, famous).
_KEEP_S = ("ss", "us", "ous")


def _doubled(stem: str) -> bool:
    return len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS


def _word_candidates(w: str) -> list[str]:
    if w in IRREGULAR:
        return list(IRREGULAR[w])
    out: list[str] = []
    n = len(w)
    if n > 4 and w.endswith("men"):  # firemen, policewomen
        out.append(w[:-3] + "man")
    if n > 4 and w.endswith("ies"):  # puppies, movies
        out += [w[:-3] + "y", w[:-1]]
    elif n > 4 and w.endswith("ves"):  # shelves, gloves
        out += [w[:-3] + "f", w[:-3] + "fe", w[:-1]]
    elif n > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):  # glasses, dishes, watches, boxes
        out += [w[:-2], w[:-1]]
        if w.endswith("zzes"):  # quizzes
            out.append(w[:-3])
    elif n > 4 and w.endswith("oes"):  # tomatoes, shoes
        out += [w[:-2], w[:-1]]
    elif n > 3 and w.endswith("ses"):  # horses, buses
        out += [w[:-1], w[:-2]]
    elif n > 2 and w.endswith("s") and not w.endswith(_KEEP_S):  # cats
        out.append(w[:-1])
    if n >= 6 and w.endswith("ing"):  # running, making, walking, skiing
        stem = w[:-3]
        out.append(stem)
        if _doubled(stem):
            out.append(stem[:-1])
        out.append(stem + "e")
        if w.endswith("ying"):
            out.append(w[:-4] + "ie")
    elif n >= 5 and w.endswith("ed"):  # jumped, stopped, baked, fried
        stem = w[:-2]
        if w.endswith("ied"):
            out.append(w[:-3] + "y")
        out.append(stem)
        if _doubled(stem):
            out.append(stem[:-1])
        out.append(w[:-1])
    return out


def fold_candidates(tag: str) -> list[str]:
    """Forms `tag` (already normalised) may be an inflection of, most likely first; `[]` when none."""
    prefix, _, word = tag.rpartition("-")
    if not word.isascii() or not word.isalpha():
        return []
    lead = prefix + "-" if prefix else ""
    out: list[str] = []
    for c in _word_candidates(word):
        if len(c) >= 2 and c != word and lead + c not in out:
            out.append(lead + c)
    return out

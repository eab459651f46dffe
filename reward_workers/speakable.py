"""Turn model output into text a TTS engine can read aloud.

A policy under RL pressure emits markdown, HTML, URLs, emoji, code and sometimes pages of junk. TTS
engines either read such things literally ("asterisk asterisk"), spell them letter by letter (hashes,
URLs), or choke on them (control characters). The reward must describe *speech*, so everything that
would not be said by a person reading the text aloud is removed here, once, before TTS and before the
word list used for text features is built (both see the same words).

Nothing here imports a model library; it is pure string processing.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

__all__ = [
    "SpeakableText",
    "UnspeakableText",
    "looks_english",
    "make_speakable",
    "word_spans",
]


class UnspeakableText(ValueError):
    """Nothing speakable is left (empty, emoji only, punctuation only, code only).

    The reward worker records this as an outcome of the sample instead of crashing.
    """


@dataclass(frozen=True)
class SpeakableText:
    text: str  # cleaned text, single-spaced, NFKC
    truncated: bool  # True when the max_chars cap cut the text
    dropped_chars: int  # len(input) - len(output), clipped at 0: markup, symbols, whitespace and the cut tail


# --- markup patterns (applied in this order) -------------------------------------------------------------
_FENCED_CODE = re.compile(r"(```|~~~)[^\n]*\n.*?(?:\n\1|\Z)", re.DOTALL)  # code is not speech: dropped whole
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_BLOCK = re.compile(r"<br\s*/?>|</?(?:p|div|li|h[1-6]|tr|ul|ol|table)\b[^>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")  # [text](url) -> text
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_INLINE_CODE = re.compile(r"`+([^`\n]*)`+")  # `name` -> name (usually a single identifier-like word)
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s*(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+(.*)$")
_BLOCKQUOTE = re.compile(r"^\s*(?:>\s?)+(.*)$")
_RULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?\s*$")
_EMPHASIS = re.compile(r"(\*{1,3}|~~)(?=\S)(.+?)(?<=\S)\1")
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\1(?!\w)")  # snake_case is not emphasis
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_STRAY_MARKUP = re.compile(r"[*_~`#|\\]+")  # leftovers of unbalanced markup; never spoken sensibly

_TERMINAL_PUNCT = ".!?:;,\u2026"


def _map_char(ch: str) -> str:
    """What one character becomes before it reaches the TTS engine ("" = dropped).

    Dropped: symbols of class So/Sk (emoji, dingbats, box drawing, skin-tone modifiers), math symbols
    (Sm) other than ASCII ones and ``×÷±−`` (arrows, logic and set signs are read as their Unicode names),
    format characters Cf (zero-width joiner, BOM), private-use and unassigned code points, surrogates,
    enclosing marks (keycap), variation selectors. Kept: letters, digits, punctuation, ASCII math ("+" is
    read "plus"), currency (Sc: "$" is read "dollar"), combining accents (Mn, Mc) and whitespace.
    Other control characters and the zero-width space become a space, so they never glue two words.
    """
    if ch == "\n":
        return ch
    cat = unicodedata.category(ch)
    if cat == "Cc" or ch == "\u200b":
        return " "
    if cat in ("So", "Sk", "Cf", "Co", "Cn", "Cs", "Me"):
        return ""
    if cat == "Sm" and not ch.isascii() and ch not in "\u00d7\u00f7\u00b1\u2212":
        return ""
    code = ord(ch)
    if 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:  # variation selectors (category Mn)
        return ""
    return ch


def _strip_markup(text: str) -> str:
    text = _FENCED_CODE.sub("\n\n", text)
    text = _SCRIPT_STYLE.sub(" ", text)
    text = _HTML_COMMENT.sub(" ", text)
    text = _HTML_BLOCK.sub("\n\n", text)  # block-level tags end a sentence, inline tags do not
    text = _HTML_TAG.sub(" ", text)
    text = html.unescape(text)  # after tag removal, so "&lt;b&gt;" stays the literal text "<b>"
    text = _MD_IMAGE.sub(" ", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    text = _INLINE_CODE.sub(r"\1", text)
    return text


def _blocks(text: str) -> list[str]:
    """Split into blocks that end with a pause: paragraphs, headers, list items, quote lines, table rows.

    A block that does not end in punctuation gets a full stop, so "# Title" followed by a paragraph is
    spoken as two sentences instead of one run-on; single newlines inside prose are only line wraps.
    """
    blocks: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            blocks.append(" ".join(current))
            current.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        if not line or _RULE.match(line) or _TABLE_SEP.match(line):
            flush()
            continue
        structural = True
        if (m := _HEADER.match(line)) or (m := _LIST_ITEM.match(line)) or (m := _BLOCKQUOTE.match(line)):
            line = m.group(1)
        elif line.startswith("|") or line.count("|") >= 2:
            line = ", ".join(c.strip() for c in line.strip("|").split("|") if c.strip())
        else:
            structural = False
        if structural:
            flush()
            current.append(line)
            flush()
        else:
            current.append(line)
    flush()
    return blocks


def _clean_block(block: str, max_word_chars: int) -> str:
    for _ in range(2):  # twice for nesting (**_x_**)
        block = _EMPHASIS.sub(r"\2", block)
        block = _UNDERSCORE_EMPHASIS.sub(r"\2", block)
    block = _STRAY_MARKUP.sub(" ", block)
    # A "word" longer than max_word_chars is a hash, a base64 blob or degenerate output: a TTS engine
    # spells it letter by letter for seconds, which would dominate the reward. Drop it.
    words = [w for w in block.split() if len(w) <= max_word_chars]
    return " ".join(words)


def _has_speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _cap(text: str, max_chars: int) -> tuple[str, bool]:
    """Cut to at most max_chars on a word boundary (a single over-long word is cut hard)."""
    if len(text) <= max_chars:
        return text, False
    head = text[: max_chars + 1]
    cut = head.rfind(" ")
    out = head[:cut] if cut > 0 else text[:max_chars]
    return out.rstrip(), True


def make_speakable(text: str, max_chars: int, *, max_word_chars: int = 48) -> SpeakableText:
    """Normalise ``text`` for TTS; raise :class:`UnspeakableText` when nothing speakable remains.

    Steps: NFKC; drop fenced code blocks, HTML tags/comments/script, markdown images, URLs and e-mail
    addresses; keep link text and inline-code text; unwrap headers, list items, quotes, tables and
    emphasis; drop emoji/symbols, control and format characters; drop tokens longer than
    ``max_word_chars``; collapse whitespace; cap at ``max_chars`` on a word boundary.
    Non-English text is kept (see :func:`looks_english`).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    original_len = len(text)
    out = unicodedata.normalize("NFKC", text)
    out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    out = _strip_markup(out)
    out = _ANSI_ESCAPE.sub(" ", out)
    out = "".join(_map_char(ch) for ch in out)
    pieces = [_clean_block(b, max_word_chars) for b in _blocks(out)]
    pieces = [p for p in pieces if _has_speakable(p)]
    sentences = []
    for i, p in enumerate(pieces):
        if i < len(pieces) - 1 and p[-1] not in _TERMINAL_PUNCT:
            p += "."
        sentences.append(p)
    out = " ".join(sentences)
    out = re.sub(r"\s+", " ", out).strip()
    out = re.sub(r"\s+([,.;:!?])", r"\1", out)  # "word ," left by removed markup -> "word,"
    if not _has_speakable(out):
        raise UnspeakableText(f"nothing speakable in {original_len} input characters")
    out, truncated = _cap(out, max_chars)
    if not _has_speakable(out):  # e.g. the cap kept only a leading "--"
        raise UnspeakableText(f"nothing speakable within the first {max_chars} characters")
    return SpeakableText(text=out, truncated=truncated, dropped_chars=max(0, original_len - len(out)))


_WORD = re.compile(r"\S+")


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` as (word, start, end) character offsets.

    A word is a whitespace-delimited token with at least one letter or digit, punctuation attached
    ("world," stays "world,"), as WhisperX reports words. Punctuation-only tokens ("-", "...") are not
    words: no engine speaks them and no ASR returns them.
    """
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text) if _has_speakable(m.group())]


# The most frequent English words (function words dominate any English passage of a few words).
_COMMON_EN_WORDS = """the be to of and a an in that have has had i it for not on with he as you do does did at this but
    his by from they we say her she or will my one all would there their what so up out if about who get
    which go me when make can like time no just him know take people into year your good some could them
    see other than then now look only come its over think also back after use two how our work first well
    way even new want because any these give day most us is are was were been am being here very more
    much many should may might must shall where why yes let each those such own same few both through
    before under again never always"""
_COMMON_EN = frozenset(_COMMON_EN_WORDS.split())


def looks_english(text: str) -> bool:
    """Cheap guess whether ``text`` is English, recorded per sample (espeak speaks it with the en voice).

    Two tests: at least 90 % of letters are ASCII, and, for texts of 4+ words, at least 15 % of words are
    among ~150 common English words (typical English prose scores 40-60 %; French/German/Spanish written
    in ASCII score near 0). Texts of 1-3 words are judged on the letters alone.
    """
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return False
    ascii_fraction = sum(ch.isascii() for ch in letters) / len(letters)
    if ascii_fraction < 0.9:
        return False
    words = [w for w in re.findall(r"[A-Za-z']+", text.lower())]
    if len(words) < 4:
        return True
    common = sum(w.strip("'") in _COMMON_EN for w in words)
    return common / len(words) >= 0.15

"""Text cleaning shared by preprocess (every text of every row) and the built-in task (which must not
write a pair that cleaning would turn into an empty text or a tie)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; \t and \n carry layout and stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Runs of spaces between visible characters. Leading indentation is left alone: code in responses needs it.
_SPACE_RUN = re.compile(r"(?<=\S) {2,}(?=\S)")
CLEAN_STEPS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("unicode_nfc", lambda t: unicodedata.normalize("NFC", t)),  # one code point sequence per glyph
    ("line_endings", lambda t: t.replace("\r\n", "\n").replace("\r", "\n")),  # before \r counts as control
    ("control_chars", lambda t: _CONTROL.sub("", t)),
    ("spaces", lambda t: _SPACE_RUN.sub(" ", t)),
    ("ends", str.strip),
)


# Characters that draw nothing: controls (Cc), format characters (Cf: zero-width space, joiners and
# non-joiners, word joiner, byte-order mark, soft hyphen, bidi marks) and separators (Zs, Zl, Zp).
# Cleaning keeps Cf characters (a ZWJ inside an emoji sequence or a soft hyphen inside a word is part of
# the text), so emptiness is judged by visibility rather than by str.strip, which keeps them all.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in _INVISIBLE


def is_blank(text: str) -> bool:
    """True when `text` has no visible character: empty, whitespace, control and format characters
    (U+200B, U+200C/U+200D, U+2060, U+FEFF, U+00AD, ...) in any mix. Text with one visible character,
    such as an emoji sequence joined by U+200D, is not blank."""
    return all(_invisible(ch) for ch in text)


def invisible_chars(text: str) -> list[str]:
    """The distinct characters of `text` that draw nothing and that str.strip keeps, as ``U+XXXX`` in
    order of appearance: what to name when a text that looks written is blank."""
    return list(dict.fromkeys(f"U+{ord(ch):04X}" for ch in text if _invisible(ch) and not ch.isspace()))


def clean_text(text: str) -> tuple[str, list[str]]:
    """Unicode NFC, ``\\r\\n``/``\\r`` -> ``\\n``, control characters removed (except ``\\n``, ``\\t``),
    runs of spaces between words collapsed, ends stripped. Returns the text and the reasons it changed."""
    reasons = []
    for reason, step in CLEAN_STEPS:
        new = step(text)
        if new != text:
            reasons.append(reason)
            text = new
    return text, reasons

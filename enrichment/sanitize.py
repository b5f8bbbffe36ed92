"""Make generated text safe to paste into a ranker prompt.

LLM output (preferences, captions) is untrusted: it can carry control characters, the model's
own special tokens (``<|im_end|>`` would end the ranker's turn early) or our prompt markers
(a fake "Candidates:" block or letter list). Everything that reaches a prompt goes through
:func:`sanitize_text` first, and the result is idempotent: sanitising twice changes nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

# Special-token shapes of common chat templates: <|im_start|>, <|endoftext|>, <s>, </s>,
# [INST], <<SYS>>, <unk>, <pad>, <bos>... matched case-insensitively.
_SPECIAL_TOKEN = re.compile(
    r"<\|[^<>|\s]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:unk|pad|bos|eos|mask|sep|cls)>",
    re.IGNORECASE,
)
# Markers the ranker's prompt templates use as structure; text must not be able to fake them.
DEFAULT_PROMPT_MARKERS = (
    "### Instruction",
    "### Input",
    "### Response",
    "Candidates:",
    "Answer:",
    "Preference:",
    "<item>",
    "<user>",
)
# Bracket look-alikes: the escaped text reads the same to a person but tokenises differently.
_ESCAPE = str.maketrans({"<": "‹", ">": "›", "[": "⟦", "]": "⟧", "|": "¦", "#": "♯", ":": "∶"})
_WHITESPACE = re.compile(r"\s+")
_LINE_BREAKS = frozenset("\t\n\r\v\f")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class SanitizeConfig:
    max_chars: int = 600  # hard cap on characters, applied last (cut at a word boundary)
    max_words: int | None = None  # optional cap on words (preferences: 60)
    extra_markers: tuple[str, ...] = ()  # e.g. the tokenizer's additional special tokens
    markers: tuple[str, ...] = field(default=DEFAULT_PROMPT_MARKERS)


def _is_control(char: str) -> bool:
    """Control (Cc), format (Cf: zero-width, bidi overrides), surrogate and private-use chars."""
    return unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co"}


def escape_markers(text: str, markers: Iterable[str]) -> str:
    """Replace special-token shapes and each marker by a look-alike that cannot tokenise as one."""
    text = _SPECIAL_TOKEN.sub(lambda m: m.group(0).translate(_ESCAPE), text)
    for marker in sorted(set(markers), key=len, reverse=True):
        if not marker:
            continue
        escaped = marker.translate(_ESCAPE)
        if escaped == marker:  # nothing bracket-like to defang: break it with a look-alike colon
            escaped = marker.replace(" ", "\u00a0")
        text = re.sub(re.escape(marker), escaped, text, flags=re.IGNORECASE)
    return text


def cap_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words])


def cap_chars(text: str, max_chars: int) -> str:
    """Cut to ``max_chars`` at the last word boundary (or hard, for one very long word)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def sanitize_text(text: str, config: SanitizeConfig | None = None) -> str:
    """NFKC-normalise, drop control characters, collapse whitespace, escape, then cap length."""
    config = config or SanitizeConfig()
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if c in _LINE_BREAKS else "" if _is_control(c) else c for c in text)
    text = _WHITESPACE.sub(" ", text).strip()
    text = escape_markers(text, (*config.markers, *config.extra_markers))
    if config.max_words is not None:
        text = cap_words(text, config.max_words)
    return cap_chars(text, config.max_chars)


def cut_repetition(text: str, n: int = 3) -> str:
    """Cut a degenerate loop: stop before the first word n-gram that already occurred.

    Greedy decoding of a small model can cycle ("horror, crime, action, horror, crime, ...");
    this keeps the text up to where the cycle starts, whatever the backend.
    """
    spans = [(m.start(), m.group(0).lower()) for m in _WORD.finditer(text)]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(spans) - n + 1):
        gram = tuple(word for _, word in spans[i : i + n])
        if gram in seen:
            return text[: spans[i][0]].rstrip(" ,;:-")
        seen.add(gram)
    return text

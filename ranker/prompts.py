"""Hybrid ranking prompts: text (LlamaRec / MLLM4Rec / CoT-Rec) plus soft-token slots (RSLLM).

A prompt is a pure function of its inputs (``PromptInput``), its switches (``PromptConfig``) and
the tokenizer. It names each candidate with a letter A..T and ends right where the model's next
token is the answer letter. Soft slots (a projected item embedding after an item's text, a
projected user vector at the start of the history) are placeholder tokens here; ``PromptLayout``
keeps the raw embeddings so the caller's projector can fill them (``ranker.core``) or train
through them (``ranker.train``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ranker.backends.base import RenderedPrompt
from ranker.domains import DOMAINS
from ranker.prompt_tokens import PIECE_BREAK, PromptError, PromptTokenizer
from ranker.signals import candidate_signals
from ranker.verbalizer import letters_for

ITEM_SLOT = "<item>"  # how an item soft token shows in the rendered text
USER_SLOT = "<user>"  # how the user soft token shows in the rendered text
CANDIDATE_SLOT = "<cand>"  # how a candidate's signal token shows in the rendered text
_ITEM_MARK = "\x00item\x00"
_USER_MARK = "\x00user\x00"
_CANDIDATE_MARK = "\x00candidate\x00"
_MARKS = ((_ITEM_MARK, "item"), (_USER_MARK, "user"), (_CANDIDATE_MARK, "candidate"))
_SLOT_TEXT = {"item": ITEM_SLOT, "user": USER_SLOT, "candidate": CANDIDATE_SLOT}
_KIND_OF_MARK = dict(_MARKS)
_MARK_PATTERN = re.compile(
    "(" + "|".join(re.escape(mark) for mark in (*_KIND_OF_MARK, PIECE_BREAK)) + ")"
)


@dataclass(frozen=True)
class PromptItem:
    title: str
    caption: str | None = None
    embedding: np.ndarray | None = field(default=None, compare=False)
    item_id: str | None = None  # lets a ranker that ships its own item table look the item up


@dataclass(frozen=True)
class PromptInput:
    history: Sequence[PromptItem]  # oldest first
    candidates: Sequence[PromptItem]  # in the order they are shown (A, B, ...)
    preference: str | None = None
    user_embedding: np.ndarray | None = field(default=None, compare=False)
    retriever_scores: np.ndarray | None = field(default=None, compare=False)  # candidate order
    timestamp: float | None = None  # decision time (epoch s): what "recent" means (ranker.trends)
    candidate_context: np.ndarray | None = field(default=None, compare=False)  # [n, k] extra
    # per-candidate evidence the ranker computed for this decision (e.g. recent popularity)
    user_attributes: Mapping[str, object] | None = field(default=None, compare=False)
    # who the user is (gender, age, occupation), for ranker.demographics; None = unknown
    history_ids: Sequence[str] | None = field(default=None, compare=False)
    # the user's whole known history (ids, oldest first) for the run tables (ranker.run_tables),
    # when it is longer than ``history``; None = the ids of ``history``
    candidate_measures: np.ndarray | None = field(default=None, compare=False)  # [n, m] extra
    # per-candidate quantities kept on their own scale (ranker.lifecycle), not the context's


def appended_columns(columns: np.ndarray | None, extra: np.ndarray) -> np.ndarray:
    """Per-candidate ``columns`` (``[n, k]``, or None for none yet) with ``extra`` (``[n, m]``)
    after them: how the run tables add to ``candidate_context`` and ``candidate_measures``."""
    return extra if columns is None else np.concatenate([np.asarray(columns), extra], axis=1)


@dataclass(frozen=True)
class PromptConfig:
    domain: str = "movies"  # persona and nouns, a key of DOMAINS
    persona: bool = True  # MLLM4Rec role-play opening (else LlamaRec's plain instruction)
    captions: bool = True  # items as "title : caption" when a caption exists (MLLM4Rec)
    preference: bool = True  # the user's preference text when given (CoT-Rec)
    item_soft_tokens: bool = False  # a projected item embedding after each item (RSLLM, LLaRA)
    user_soft_token: bool = False  # a projected user vector before the history (CIT-Rec)
    item_titles: bool = True  # False: an item with an embedding is shown by its soft token only
    candidate_signals: bool = False  # each candidate is one token of its signals (ranker.signals)
    relative_signals: bool = False  # signal columns relative to the list (ranker.signals);
    # the candidate projector then skips its per-row layer norm
    signal_embeddings: bool = True  # False: signals without retriever-space columns, so a
    # ranker trained on a teacher retriever's lists serves another retriever (ranker.signals)
    terse: bool = False  # a few words of instruction, no chat template (short = fast on CPU)
    candidate_letters: bool = True  # write each candidate's letter before it (terse mode: off
    # when the candidate tokens carry their letter themselves, see ranker.projector anchors)
    max_history: int = 20  # most recent items kept (LlamaRec: 20)
    max_title_tokens: int = 32  # titles are cut to this many tokens (LlamaRec: 32)
    max_caption_tokens: int = 32
    max_preference_tokens: int = 128
    max_prompt_tokens: int = 1536  # oldest history items are dropped until the prompt fits
    chat_template: bool = True  # wrap in the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise PromptError(f"unknown domain {self.domain!r}; choose one of {sorted(DOMAINS)}")
        if self.max_history < 0 or self.max_title_tokens < 1 or self.max_prompt_tokens < 16:
            raise PromptError("max_history >= 0, max_title_tokens >= 1, max_prompt_tokens >= 16")

    @classmethod
    def compact(cls, **overrides) -> PromptConfig:
        """Fewer and shorter titles: several times cheaper to train and score on CPU."""
        values = {"max_history": 10, "max_title_tokens": 10, "max_caption_tokens": 12}
        return cls(**{**values, **overrides})

    @classmethod
    def pointer(cls, **overrides) -> PromptConfig:
        """The CPU recipe: a terse prompt of soft tokens, the user and then one signal token per
        candidate (~42 tokens; each token carries its letter through the projector's anchor).
        The LLM points at the candidate whose token carries the strongest evidence."""
        values = {
            "persona": False,
            "captions": False,
            "preference": False,
            "item_soft_tokens": False,
            "user_soft_token": True,
            "item_titles": False,
            "candidate_signals": True,
            "terse": True,
            "max_history": 0,
            "chat_template": False,
            "candidate_letters": False,
        }
        return cls(**{**values, **overrides})

    @property
    def reads_retriever_space(self) -> bool:
        """Whether its soft tokens carry vectors of the retriever it was trained with (so it
        must be served with that retriever): the user token, or signal rows with embeddings."""
        return self.candidate_signals and (self.signal_embeddings or self.user_soft_token)

    @property
    def uses_soft_tokens(self) -> bool:
        return self.item_soft_tokens or self.user_soft_token or self.candidate_signals


@dataclass(frozen=True)
class PromptLayout:
    """A rendered prompt whose soft slots still hold raw (unprojected) embeddings."""

    token_ids: tuple[int, ...]
    letter_token_ids: tuple[int, ...]
    text: str
    soft_positions: tuple[int, ...] = ()
    soft_kinds: tuple[str, ...] = ()  # "item" or "user", per soft position
    soft_inputs: tuple[np.ndarray, ...] = field(default=(), compare=False)
    soft_slots: tuple[int, ...] = ()  # per soft position: the candidate's index, or -1
    history_used: int = 0  # history items that fit (the most recent ones)

    def with_soft_vectors(self, soft_vectors: np.ndarray | None) -> RenderedPrompt:
        """The backend-ready prompt, given the projected rows (``[n_soft, hidden]``)."""
        return RenderedPrompt(
            token_ids=self.token_ids,
            letter_token_ids=self.letter_token_ids,
            text=self.text,
            soft_positions=self.soft_positions,
            soft_vectors=soft_vectors if self.soft_positions else None,
        )


def _candidate_text(item: PromptItem, config: PromptConfig, tok: PromptTokenizer) -> str:
    """A candidate in signal mode: its (optional) title, then its signal token."""
    if not config.item_titles:
        return _CANDIDATE_MARK
    return tok.line(item.title, config.max_title_tokens) + " " + _CANDIDATE_MARK


def _item_text(item: PromptItem, config: PromptConfig, tok: PromptTokenizer) -> tuple[str, bool]:
    """An item's text and whether it carries a soft slot."""
    soft = config.item_soft_tokens and item.embedding is not None
    parts = []
    if config.item_titles or not soft:
        parts.append(tok.line(item.title, config.max_title_tokens))
    if config.captions and item.caption:
        caption = tok.line(item.caption, config.max_caption_tokens)
        if caption:
            parts.append(": " + caption if parts else caption)
    if soft:
        parts.append(_ITEM_MARK)
    return " ".join(parts), soft


def _instruction(config: PromptConfig, with_captions: bool) -> str:
    domain = DOMAINS[config.domain]
    if config.persona:
        text = (
            f"{domain.persona} I will give you the {domain.plural} I {domain.verb} before, "
            f"oldest first, and a candidate pool of {domain.plural}. Recommend the "
            f"{domain.singular} from the candidate pool I am most likely to choose next "
            "with its index letter."
        )
    else:
        text = (
            "Given user history in chronological order, recommend an item from the candidate "
            "pool with its index letter."
        )
    if with_captions:
        noun = domain.singular if config.persona else "item"
        text += f" Each {noun} is written as title : description."
    return text


def _body(
    history: list[str], candidates: list[str], preference: str | None, user_soft: bool
) -> str:
    lines = []
    if preference:
        lines.append(f"Preference: {preference}")
    if user_soft:
        lines.append(f"User: {_USER_MARK}")
    lines.append("History:")
    lines.extend(f"{n}.{PIECE_BREAK} {text}" for n, text in enumerate(history, start=1))
    if not history:
        lines.append("(none)")
    lines.append("Candidate pool:")
    lines.extend(
        f"{letter}.{PIECE_BREAK} {text}"
        for letter, text in zip(letters_for(len(candidates)), candidates, strict=True)
    )
    return "\n".join(lines)


def _terse_body(
    history: list[str],
    candidates: list[str],
    preference: str | None,
    user_soft: bool,
    letters: bool = True,
) -> str:
    """Pointer prompt: a line per part, candidates as ``A <cand> B <cand> ...`` (or, without
    ``letters``, just their tokens)."""
    lines = ["Pick the candidate this user chooses next."]
    if preference:
        lines.append(f"Preference: {preference}")
    if user_soft:
        lines.append(f"User: {_USER_MARK}")
    if history:
        lines.append("History: " + " ".join(history))
    if letters:
        pairs = zip(letters_for(len(candidates)), candidates, strict=True)
        candidates = [f"{letter}{PIECE_BREAK} {text}" for letter, text in pairs]
    lines.append("Candidates: " + (" " if letters else "").join(candidates))
    lines.append("Answer:")
    return "\n".join(lines) + "\n"


def _wrap(instruction: str, body: str, config: PromptConfig, tok: PromptTokenizer) -> str:
    if config.terse:
        return body
    if config.chat_template and tok.has_chat_template:
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": body},
        ]
        return tok.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{instruction}\n\n### Input:\n{body}\n\n### Response:\n"


def _assemble(text: str, tok: PromptTokenizer) -> tuple[list[int], list[int], list[str], str]:
    """Token ids, soft positions and kinds, and display text of marked prompt text (one pass:
    the split alternates text and marks; the text between two soft slots may hold breaks)."""
    ids: list[int] = []
    positions: list[int] = []
    kinds: list[str] = []
    display: list[str] = []
    pieces: list[str] = []  # text since the last soft slot, one entry per break
    for n, piece in enumerate(_MARK_PATTERN.split(text)):
        if n % 2 == 0:
            if piece:
                pieces.append(piece)
        elif piece != PIECE_BREAK:
            ids.extend(tok.encode_pieces(pieces))
            display.extend(pieces)
            pieces = []
            kind = _KIND_OF_MARK[piece]
            positions.append(len(ids))
            kinds.append(kind)
            ids.append(tok.placeholder_id)
            display.append(_SLOT_TEXT[kind])
    ids.extend(tok.encode_pieces(pieces))
    display.extend(pieces)
    return ids, positions, kinds, "".join(display)


def render_prompt(inp: PromptInput, config: PromptConfig, tok: PromptTokenizer) -> PromptLayout:
    """Render ``inp`` (candidates in the given order) into token ids with soft slots.

    History keeps the ``max_history`` most recent items; while the prompt is longer than
    ``max_prompt_tokens`` the oldest remaining item is dropped.
    """
    num = len(inp.candidates)
    letters_for(num)
    if config.candidate_signals:
        candidates = [(_candidate_text(item, config, tok), False) for item in inp.candidates]
    else:
        candidates = [_item_text(item, config, tok) for item in inp.candidates]
    history_items = list(inp.history)[-config.max_history :] if config.max_history else []
    history = [_item_text(item, config, tok) for item in history_items]
    with_captions = config.captions and any(
        item.caption for item in [*history_items, *inp.candidates]
    )
    preference = None
    if config.preference and inp.preference and inp.preference.strip():
        preference = tok.line(inp.preference, config.max_preference_tokens)
    user_soft = config.user_soft_token and inp.user_embedding is not None
    instruction = _instruction(config, with_captions)
    while True:
        parts = ([t for t, _ in history], [t for t, _ in candidates], preference, user_soft)
        if config.terse:
            body = _terse_body(*parts, letters=config.candidate_letters)
        else:
            body = _body(*parts)
        ids, positions, kinds, display = _assemble(_wrap(instruction, body, config, tok), tok)
        if len(ids) <= config.max_prompt_tokens:
            break
        if not history:
            raise PromptError(
                f"the prompt needs {len(ids)} tokens without any history, over max_prompt_tokens="
                f"{config.max_prompt_tokens}: shorten titles or raise the limit"
            )
        history = history[1:]
        history_items = history_items[1:]
    soft_inputs = _soft_inputs(kinds, inp, history_items, history, candidates)
    if config.candidate_signals:
        soft_inputs = (*soft_inputs, *signal_rows(inp, config))
    candidate_index = iter(range(num))
    slots = tuple(next(candidate_index) if kind == "candidate" else -1 for kind in kinds)
    return PromptLayout(
        token_ids=tuple(ids),
        letter_token_ids=tok.letter_ids[:num],
        text=display,
        soft_positions=tuple(positions),
        soft_kinds=tuple(kinds),
        soft_inputs=soft_inputs,
        soft_slots=slots,
        history_used=len(history),
    )


def signal_rows(inp: PromptInput, config: PromptConfig) -> np.ndarray:
    """The candidates' signal rows (``ranker.signals``); says what is missing, if anything."""
    missing = [
        name
        for name, absent in (
            ("the user vector", inp.user_embedding is None),
            ("the retriever's scores", inp.retriever_scores is None),
            ("candidate item rows", any(c.embedding is None for c in inp.candidates)),
        )
        if absent
    ]
    if missing:
        raise PromptError("candidate signals need " + ", ".join(missing))
    history = [h.embedding for h in inp.history if h.embedding is not None]
    width = len(inp.candidates[0].embedding)
    return candidate_signals(
        inp.user_embedding,
        np.stack([c.embedding for c in inp.candidates]),
        np.stack(history) if history else np.zeros((0, width), np.float32),
        inp.retriever_scores,
        inp.candidate_context,
        config.relative_signals,
        config.signal_embeddings,
        inp.candidate_measures,
    )


def _soft_inputs(
    kinds: list[str],
    inp: PromptInput,
    history_items: list[PromptItem],
    history: list[tuple[str, bool]],
    candidates: list[tuple[str, bool]],
) -> tuple[np.ndarray, ...]:
    """Raw embeddings in slot order: user first, then history items, then candidates' item
    tokens (signal rows, one per candidate, follow them: the caller appends those)."""
    rows: list[np.ndarray] = []
    if kinds and kinds[0] == "user":
        rows.append(np.asarray(inp.user_embedding, dtype=np.float32))
    items = [*history_items, *inp.candidates]
    flags = [soft for _, soft in [*history, *candidates]]
    rows.extend(
        np.asarray(item.embedding, dtype=np.float32)
        for item, soft in zip(items, flags, strict=True)
        if soft
    )
    expected = len(kinds) - kinds.count("candidate")
    if len(rows) != expected:
        raise PromptError(f"{expected} soft slots but {len(rows)} embeddings")
    return tuple(rows)


def reorder(inp: PromptInput, order: Sequence[int]) -> PromptInput:
    """The same input with candidates shown in ``order`` (position -> candidate index)."""

    def shown(columns: np.ndarray | None) -> np.ndarray | None:
        return None if columns is None else np.asarray(columns)[list(order)]

    return replace(
        inp,
        candidates=[inp.candidates[i] for i in order],
        retriever_scores=shown(inp.retriever_scores),
        candidate_context=shown(inp.candidate_context),
        candidate_measures=shown(inp.candidate_measures),
    )

"""CoT-Rec's user preference maintenance (paper 002): a running summary of each user's taste.

Like an RNN over the history: the LLM reads the user's interactions in chronological,
overlapping windows (``window`` items, advancing by ``stride``), and each step rewrites the
previous summary with what the new window shows. A user's *first* summary reads only the most
recent window by default (``first_build="recent"``): one generation per user, so a full
catalogue of users is summarised in minutes instead of hours; ``"full"`` walks the whole
history as CoT-Rec does. The result is a preference text of at most 60 words plus a
*watermark*: how many interactions of the history it has read. An update run starts from the
stored summary and reads only interactions after the watermark (with the window overlap for
continuity), so keeping preferences fresh costs little.

All generated text is sanitised (``enrichment.sanitize``) before it is stored, because it ends
up inside ranker prompts.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from enrichment.checkpoint import JsonlCheckpoint
from enrichment.generation import Conversation, Generator, GeneratorSpec
from enrichment.sanitize import SanitizeConfig, cut_repetition, sanitize_text
from tandem.data import Catalog, Dataset

KIND = "enrichment-preferences"
PREFERENCES_FILE = "preferences.jsonl"
HISTORIES = ("train", "full")
FIRST_BUILDS = ("recent", "full")

_LABEL = re.compile(
    r"^\s*(?:updated\s+)?(?:preferences?|summary|description|taste)\s*[:\-]\s*", re.I
)


@dataclass(frozen=True)
class PreferenceConfig:
    window: int = 20  # interactions the LLM reads per step
    stride: int = 10  # step between window starts (window - stride items overlap)
    max_words: int = 60  # cap on the preference text (CoT-Rec)
    max_chars: int = 480  # hard cap in characters after sanitising
    history: str = "train"  # "train": without each user's validation/test items; "full": all
    domain: str = "movie"  # the noun used in prompts
    include_ratings: bool = True  # show explicit ratings (when the data has them)
    max_history: int | None = None  # read at most the newest N unread interactions (None: all)
    first_build: str = "recent"  # a user's first summary: the newest window only, or "full"

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.window:
            raise ValueError(
                f"need 1 <= stride <= window, got stride={self.stride}, window={self.window}"
            )
        if self.max_history is not None and self.max_history < self.window:
            raise ValueError(f"max_history ({self.max_history}) must be at least the window")
        if self.history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {self.history!r}")
        if self.first_build not in FIRST_BUILDS:
            raise ValueError(f"first_build must be one of {FIRST_BUILDS}, got {self.first_build!r}")


@dataclass(frozen=True)
class UserHistory:
    user_id: str
    items: np.ndarray  # catalog indices, oldest first
    ratings: np.ndarray  # float32, NaN where unknown


@dataclass(frozen=True)
class PreferenceState:
    """One output record: ``{"user_id", "preference", "watermark"}`` (feature-store format)."""

    user_id: str
    preference: str
    watermark: int  # interactions of the user's history already summarised

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping) -> PreferenceState:
        return cls(str(record["user_id"]), str(record["preference"]), int(record["watermark"]))


def user_histories(dataset: Dataset, history: str = "train") -> list[UserHistory]:
    """Per user (user-index order): the part of the sequence preferences may read.

    "train" drops the last two interactions (the leave-one-out validation and test targets),
    so preferences never leak the items the ranker is evaluated on.
    """
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    frame = dataset.interactions.frame
    items = frame["item_index"].to_numpy()
    ratings = frame["rating"].to_numpy(dtype=np.float32)
    bounds = np.flatnonzero(np.diff(frame["user_index"].to_numpy())) + 1
    cut = 2 if history == "train" else 0
    out = []
    for user_id, seq, rates in zip(
        dataset.interactions.user_ids,
        np.split(items, bounds),
        np.split(ratings, bounds),
        strict=True,
    ):
        end = len(seq) - cut
        out.append(UserHistory(user_id, seq[:end].astype(np.int64), rates[:end]))
    return out


def item_lines(catalog: Catalog) -> list[str]:
    """How an item is shown to the LLM, by catalog index (row 0 is padding, empty)."""
    lines = [""]
    frame = catalog.frame
    for title, year, genres in zip(frame["title"], frame["year"], frame["genres"], strict=True):
        details = [str(int(year))] if not pd.isna(year) else []
        if len(genres):
            details.append(", ".join(genres))
        lines.append(f"{title} ({'; '.join(details)})" if details else str(title))
    return lines


def windows(length: int, window: int, stride: int, start: int = 0) -> list[tuple[int, int]]:
    """Overlapping ``[begin, end)`` windows that together cover ``[start, length)``."""
    spans: list[tuple[int, int]] = []
    begin = start
    while begin < length:
        end = min(begin + window, length)
        spans.append((begin, end))
        if end >= length:
            break
        begin += stride
    return spans


def _listing(
    history: UserHistory, span: tuple[int, int], lines: Sequence[str], ratings: bool
) -> str:
    rows = []
    for item, rating in zip(
        history.items[span[0] : span[1]], history.ratings[span[0] : span[1]], strict=True
    ):
        rated = f", rated {rating:g}/5" if ratings and not math.isnan(rating) else ""
        rows.append(f"- {lines[item]}{rated}")
    return "\n".join(rows)


def build_prompt(
    previous: str, listing: str, config: PreferenceConfig, rated: bool = True
) -> Conversation:
    """First step: describe the taste; later steps: revise the previous summary.

    Worded for small instruction models: one user turn, the listing before the task, and a
    fixed opening ("This user enjoys") that keeps a 135M model writing prose, not lists.
    """
    domain = config.domain
    ratings = ", with their ratings (1-5)" if rated else ""
    task = (
        f"Describe this user's {domain} preferences (favourite genres, eras and themes, and "
        f'what they dislike) in at most {config.max_words} words. Start with "This user enjoys".'
    )
    if previous:
        content = (
            f"What we know about this user's {domain} taste: {previous}\n\n"
            f"The {domain}s they watched next, oldest first{ratings}:\n"
            f"{listing}\n\nUpdate the description. {task}"
        )
    else:
        content = (
            f"Here are the {domain}s a user watched, oldest first{ratings}:\n{listing}\n\n{task}"
        )
    return [{"role": "user", "content": content}]


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def clean_preference(
    text: str, config: PreferenceConfig, special_tokens: Iterable[str] = ()
) -> str:
    """First paragraph, without a "Preference:" label or repeated sentences, sanitised, capped."""
    paragraph = next((p for p in text.strip().split("\n\n") if p.strip()), "")
    paragraph = _LABEL.sub("", paragraph.strip())
    sentences = list(dict.fromkeys(s.strip() for s in _SENTENCE.split(paragraph) if s.strip()))
    return sanitize_text(
        cut_repetition(" ".join(sentences)),
        SanitizeConfig(
            max_chars=config.max_chars,
            max_words=config.max_words,
            extra_markers=tuple(special_tokens),
        ),
    )


def summarise_users(
    histories: Sequence[UserHistory],
    lines: Sequence[str],
    generator: Generator,
    config: PreferenceConfig,
    previous: Mapping[str, PreferenceState] | None = None,
) -> list[PreferenceState]:
    """Advance every user's summary over their unread interactions, batched across users.

    Step ``k`` sends the k-th window of every user that has one in one generate call, so the
    LLM always works on a full batch while each user's summary still evolves in order.
    """
    previous = previous or {}
    special = generator.special_tokens()
    plans, current = [], []
    for history in histories:
        state = previous.get(history.user_id)
        watermark = state.watermark if state is not None else 0
        if watermark > len(history.items):
            raise ValueError(
                f"user {history.user_id!r}: watermark {watermark} is past the history "
                f"({len(history.items)} interactions): was the stored preference built from "
                "other data?"
            )
        overlap = config.window - config.stride
        start = max(0, watermark - overlap) if watermark else 0
        if state is None and config.first_build == "recent":
            start = max(0, len(history.items) - config.window)  # one window: the newest
        if config.max_history is not None:  # bound the cost of very long (or stale) histories
            start = max(start, len(history.items) - config.max_history)
        spans = windows(len(history.items), config.window, config.stride, start)
        if watermark and spans and spans[-1][1] <= watermark:
            spans = []  # nothing new after the watermark
        plans.append(spans)
        current.append(state.preference if state is not None else "")
    for step in range(max((len(p) for p in plans), default=0)):
        active = [u for u, spans in enumerate(plans) if step < len(spans)]
        conversations = [
            build_prompt(
                current[u],
                _listing(histories[u], plans[u][step], lines, config.include_ratings),
                config,
                rated=config.include_ratings and not np.isnan(histories[u].ratings).all(),
            )
            for u in active
        ]
        for u, text in zip(active, generator.generate(conversations), strict=True):
            cleaned = clean_preference(text, config, special)
            if cleaned:
                current[u] = cleaned
    return [
        PreferenceState(
            h.user_id,
            current[u],
            len(h.items)
            if plans[u]
            else (previous[h.user_id].watermark if h.user_id in previous else 0),
        )
        for u, h in enumerate(histories)
    ]


@dataclass
class JobStats:
    users: int = 0  # summarised in this run
    resumed: int = 0  # already done by an earlier, interrupted run
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def users_per_minute(self) -> float:
        return 60.0 * self.users / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "users": self.users,
            "resumed_users": self.resumed,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 2),
            "users_per_minute": round(self.users_per_minute, 3),
            "tokens_per_second": round(self.completion_tokens / self.seconds, 2)
            if self.seconds
            else 0.0,
        }


def _local_chunks(
    pending: Sequence[UserHistory],
    lines: Sequence[str],
    generator: Generator,
    config: PreferenceConfig,
    previous: Mapping[str, PreferenceState],
    chunk_users: int,
) -> Iterator[tuple[list[PreferenceState], int]]:
    for start in range(0, len(pending), chunk_users):
        before = generator.completion_tokens
        states = summarise_users(
            pending[start : start + chunk_users], lines, generator, config, previous
        )
        yield states, generator.completion_tokens - before


def run_preferences(
    histories: Sequence[UserHistory],
    lines: Sequence[str],
    spec: GeneratorSpec,
    config: PreferenceConfig,
    checkpoint: JsonlCheckpoint,
    previous: Mapping[str, PreferenceState] | None = None,
    chunk_users: int = 32,
    engine: str = "local",
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> JobStats:
    """Summarise every user not yet in ``checkpoint``, writing a checkpoint per chunk of users.

    A killed job loses at most one chunk: run it again on the same folder to resume. The
    clock starts once the model is loaded (local engine), so users/minute is steady-state;
    with Ray it includes starting the workers.
    """
    previous = previous or {}
    pending = [h for h in histories if h.user_id not in checkpoint]
    stats = JobStats(resumed=len(histories) - len(pending))
    if not pending:
        return stats
    if engine == "ray":
        from enrichment.ray_engine import summarise_users_ray

        start = time.perf_counter()
        results = summarise_users_ray(pending, lines, spec, config, previous, chunk_users, workers)
    elif engine == "local":
        generator = spec.build()
        start = time.perf_counter()
        results = _local_chunks(pending, lines, generator, config, previous, chunk_users)
    else:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    for states, tokens in results:
        checkpoint.write(s.to_record() for s in states)
        stats.users += len(states)
        stats.completion_tokens += tokens
        if on_progress is not None:
            on_progress(len(states))
    stats.seconds = time.perf_counter() - start
    return stats

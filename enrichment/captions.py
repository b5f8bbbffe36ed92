"""Item captions: an image captioner when there are images, else CoT-Rec's item perception.

With an image-captioning checkpoint (BLIP, a ViT+GPT-2 VisionEncoderDecoder, ...) and an item
image, the caption describes the image. Otherwise the base LLM writes one objective sentence
about the item from its title, year and genres (CoT-Rec's item perception, paper 002).
Decoding is greedy and length-capped, so the same input gives the same caption, and results
are cached in a JSONL file keyed by item id and a hash of everything that shaped the caption
(item fields, image bytes, model, prompt version): re-running only captions what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from enrichment.checkpoint import read_jsonl
from enrichment.generation import Conversation, Generator
from enrichment.images import readable_batches
from enrichment.sanitize import SanitizeConfig, cut_repetition, sanitize_text
from tandem.data import Catalog

KIND = "enrichment-captions"
CAPTIONS_FILE = "captions.jsonl"
CACHE_FILE = "cache.jsonl"
PROMPT_VERSION = "perception-v1"  # bump when the prompt changes: cached captions are redone


@dataclass(frozen=True)
class CaptionConfig:
    max_words: int = 30  # cap on a caption's words
    max_chars: int = 240  # hard cap in characters after sanitising
    domain: str = "movie"  # the noun used in the prompt
    chunk_items: int = 32  # items per generate call (and per cache flush)


@dataclass
class CaptionStats:
    cached: int = 0
    from_image: int = 0
    from_llm: int = 0
    empty: int = 0  # the model produced nothing usable: no caption rather than a bad one


def perception_prompt(row: Mapping, config: CaptionConfig) -> Conversation:
    """One objective sentence about the item (CoT-Rec's item description step)."""
    details = [str(row["year"])] if row.get("year") is not None else []
    if row.get("genres"):
        details.append(", ".join(row["genres"]))
    about = f'"{row["title"]}"' + (f" ({'; '.join(details)})" if details else "")
    return [
        {
            "role": "system",
            "content": f"You write short, factual {config.domain} descriptions.",
        },
        {
            "role": "user",
            "content": (
                f"Describe the {config.domain} {about} in one sentence of at most "
                f"{config.max_words} words: what it is about and its tone. "
                "Reply with the sentence only."
            ),
        },
    ]


def clean_caption(text: str, config: CaptionConfig, special_tokens: Sequence[str] = ()) -> str:
    """First line, sanitised and capped."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    return sanitize_text(
        cut_repetition(line),
        SanitizeConfig(
            max_chars=config.max_chars,
            max_words=config.max_words,
            extra_markers=tuple(special_tokens),
        ),
    )


def _file_digest(path: object) -> str | None:
    if not isinstance(path, str) or not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def content_hash(row: Mapping, source: str, image_digest: str | None) -> str:
    """Hash of what shapes a caption: item fields, image bytes, model and prompt version."""
    payload = {
        "title": row["title"],
        "year": row.get("year"),
        "genres": list(row.get("genres") or ()),
        "text": row.get("text"),
        "image": image_digest,
        "source": source,
        "prompt": PROMPT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :20
    ]


class CaptionCache:
    """``{"item_id", "hash", "caption"}`` lines; the newest line for a key wins."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[tuple[str, str], str] = {}
        if self.path.is_file():
            for record in read_jsonl(self.path):
                self._entries[(str(record["item_id"]), record["hash"])] = record["caption"]

    def get(self, item_id: str, digest: str) -> str | None:
        return self._entries.get((item_id, digest))

    def put(self, entries: Sequence[tuple[str, str, str]]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for item_id, digest, caption in entries:
                self._entries[(item_id, digest)] = caption
                record = {"item_id": item_id, "hash": digest, "caption": caption}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class ImageCaptioner:
    """An image-to-text checkpoint folder: model + image processor + tokenizer, greedy."""

    def __init__(self, checkpoint: Path, max_new_tokens: int = 40, batch_size: int = 8):
        self.checkpoint = Path(checkpoint)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._model = None

    @property
    def source(self) -> str:
        return f"image:{self.checkpoint.name}"

    def load(self) -> ImageCaptioner:
        if self._model is not None:
            return self
        if not (self.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{self.checkpoint} is not a model folder (no config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        config = transformers.AutoConfig.from_pretrained(self.checkpoint)
        arch = (getattr(config, "architectures", None) or [""])[0]
        model_class = getattr(transformers, arch, None) or transformers.AutoModelForImageTextToText
        self._processor = transformers.AutoImageProcessor.from_pretrained(self.checkpoint)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.checkpoint)
        self._model = model_class.from_pretrained(self.checkpoint).eval()
        return self

    def special_tokens(self) -> tuple[str, ...]:
        self.load()
        return tuple(self._tokenizer.all_special_tokens)

    def caption(self, paths: Sequence[str]) -> list[str | None]:
        """Raw captions per image; None where the image cannot be read."""
        import torch

        self.load()
        out: list[str | None] = [None] * len(paths)
        for rows, images in readable_batches(paths, self.batch_size):
            pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                generated = self._model.generate(
                    pixel_values=pixels, do_sample=False, max_new_tokens=self.max_new_tokens
                )
            texts = self._tokenizer.batch_decode(generated, skip_special_tokens=True)
            for row, text in zip(rows, texts, strict=True):
                out[row] = text
        return out


def caption_items(
    catalog: Catalog,
    cache: CaptionCache,
    generator: Generator | None,
    generator_source: str,
    captioner: ImageCaptioner | None = None,
    config: CaptionConfig = CaptionConfig(),
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, str], CaptionStats]:
    """Caption every item (cache first); returns ``{item_id: caption}`` and counts.

    Items with a readable image use ``captioner`` when given; the rest use ``generator``
    (item perception). An item whose caption comes out empty gets none.
    """
    if generator is None and captioner is None:
        raise ValueError("need an LLM (item perception) or an image captioner")
    stats = CaptionStats()
    captions: dict[str, str] = {}
    image_jobs, text_jobs = [], []
    for index in range(1, catalog.num_items + 1):
        row = {k: (None if _missing(v) else v) for k, v in catalog.row(index).items()}
        image_digest = _file_digest(row.get("image_path")) if captioner is not None else None
        if image_digest is not None:
            source = captioner.source
        elif generator is not None:
            source = generator_source
        else:
            continue  # no image and no LLM: this item gets no caption
        digest = content_hash(row, source, image_digest)
        hit = cache.get(row["item_id"], digest)
        if hit is not None:
            stats.cached += 1
            if hit:
                captions[row["item_id"]] = hit
            if on_progress is not None:
                on_progress(1)
            continue
        job = (row, digest)
        (image_jobs if image_digest is not None else text_jobs).append(job)

    def finish(jobs, raw_texts, special, counter: str) -> None:
        entries = []
        for (row, digest), raw in zip(jobs, raw_texts, strict=True):
            caption = clean_caption(raw or "", config, special)
            entries.append((row["item_id"], digest, caption))
            if caption:
                captions[row["item_id"]] = caption
                setattr(stats, counter, getattr(stats, counter) + 1)
            else:
                stats.empty += 1
        cache.put(entries)
        if on_progress is not None:
            on_progress(len(jobs))

    step = config.chunk_items
    if image_jobs:
        special = captioner.special_tokens()
        for start in range(0, len(image_jobs), step):
            chunk = image_jobs[start : start + step]
            raw = captioner.caption([r["image_path"] for r, _ in chunk])
            readable = [i for i, text in enumerate(raw) if text is not None]
            finish([chunk[i] for i in readable], [raw[i] for i in readable], special, "from_image")
            for i in (i for i, text in enumerate(raw) if text is None and generator is not None):
                row = chunk[i][0]  # an image that does not decode: describe the item instead
                text_jobs.append((row, content_hash(row, generator_source, None)))
    if text_jobs and generator is not None:
        special = generator.special_tokens()
        for start in range(0, len(text_jobs), step):
            chunk = text_jobs[start : start + step]
            texts = generator.generate([perception_prompt(r, config) for r, _ in chunk])
            finish(chunk, texts, special, "from_llm")
    return captions, stats


def read_captions(path: Path) -> dict[str, str]:
    """``{item_id: caption}`` from a captions JSONL file or a captions run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CAPTIONS_FILE
    return {str(r["item_id"]): str(r["caption"]) for r in read_jsonl(path)}

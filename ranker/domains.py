"""The domains a prompt can speak about: the persona that opens it and the nouns it uses.

MLLM4Rec opens its prompts with a role-play persona per domain; LlamaRec's plain instruction
only needs the nouns. ``PromptConfig.domain`` names one of these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    persona: str  # MLLM4Rec role-play opening
    singular: str
    plural: str
    verb: str  # past tense of what the user did with an item


DOMAINS = {
    "movies": Domain(
        "You are going to play a movie enthusiast who is selecting movies they are interested in.",
        "movie",
        "movies",
        "watched",
    ),
    "books": Domain(
        "You will play a book lover choosing the next book to read.", "book", "books", "read"
    ),
    "games": Domain(
        "You will play as a gamer selecting the games you love.", "game", "games", "played"
    ),
    "toys": Domain(
        "You will play the role of a guardian, purchasing children's toys for your own child.",
        "toy",
        "toys",
        "bought",
    ),
    "beauty": Domain(
        "You will play the role of a female, purchasing female items for yourself.",
        "item",
        "items",
        "bought",
    ),
    "music": Domain(
        "You will play a music fan choosing the artists you want to hear.",
        "artist",
        "artists",
        "listened to",
    ),
    "items": Domain(
        "You will play a shopper choosing the items you like.", "item", "items", "chose"
    ),
}

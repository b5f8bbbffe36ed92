"""Lists that benchmarks/saved_lists.py saves to train elsewhere read back as made."""

from __future__ import annotations

import numpy as np

from benchmarks.saved_lists import load_lists, save_lists
from ranker.prompts import PromptLayout


def _layout(rng: np.random.Generator, n: int) -> PromptLayout:
    """A prompt of a user token, then ``n`` candidates each as 'title <signal token>'."""
    ids, positions, kinds, inputs, slots = [5, 6], [], [], [], []
    positions.append(len(ids))
    ids.append(0)
    kinds.append("user")
    inputs.append(rng.normal(size=4).astype(np.float32))
    slots.append(-1)
    for c in range(n):
        ids += [100 + c, 200 + c]
        positions.append(len(ids))
        ids.append(0)
        kinds.append("candidate")
        inputs.append(rng.normal(size=3).astype(np.float32))
        slots.append(c)
    return PromptLayout(
        token_ids=tuple(ids),
        letter_token_ids=tuple(range(300, 300 + n)),
        text="",
        soft_positions=tuple(positions),
        soft_kinds=tuple(kinds),
        soft_inputs=tuple(inputs),
        soft_slots=tuple(slots),
        history_used=n,
    )


def test_saved_lists_read_back_as_made_and_text_only_cuts_the_soft_tokens(tmp_path):
    rng = np.random.default_rng(0)
    layouts = [_layout(rng, 3), _layout(rng, 3)]
    bases = [rng.normal(size=3), rng.normal(size=3)]
    path = tmp_path / "lists.safetensors"
    save_lists(path, layouts, [2, 0], bases, ranks=[5, 1], users=7)

    back, arrays = load_lists(path)
    assert arrays["labels"].tolist() == [2, 0] and arrays["retriever_ranks"].tolist() == [5, 1]
    assert arrays["users"] == 7  # the users the lists came from, misses included
    np.testing.assert_allclose(arrays["bases"], np.stack(bases), rtol=1e-6)
    for made, read in zip(layouts, back, strict=True):
        assert read.token_ids == made.token_ids
        assert read.letter_token_ids == made.letter_token_ids
        assert read.soft_positions == made.soft_positions
        assert read.soft_kinds == made.soft_kinds
        assert read.soft_slots == made.soft_slots and read.history_used == made.history_used
        for a, b in zip(read.soft_inputs, made.soft_inputs, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-3)  # carried in fp16

    text, _ = load_lists(path, text_only=True)
    assert text[0].token_ids == (5, 6, 100, 200, 101, 201, 102, 202)
    assert text[0].soft_positions == () and text[0].soft_inputs == () and text[0].soft_slots == ()

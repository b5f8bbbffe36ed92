"""CoT-Rec preference maintenance: windows, feeding the summary forward, watermarks, resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from enrichment.checkpoint import CheckpointMismatch, JsonlCheckpoint
from enrichment.generation import GeneratorSpec, TransformersGenerator
from enrichment.preferences import (
    PreferenceConfig,
    PreferenceState,
    UserHistory,
    clean_preference,
    item_lines,
    run_preferences,
    summarise_users,
    user_histories,
    windows,
)
from enrichment.runs import PARTIAL_FILE, read_preferences
from enrichment.runs import run_preferences as run_preferences_job
from enrichment.sanitize import cut_repetition
from tandem.testing.data import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingGenerator(TransformersGenerator):
    """The real tiny LLM, keeping every conversation it was asked to continue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[dict]] = []

    def generate(self, conversations):
        self.seen.extend(list(c) for c in conversations)
        return super().generate(conversations)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_users=6, num_items=30, min_len=8, max_len=14, seed=3)


@pytest.fixture
def generator(chatty_llm_dir):
    return RecordingGenerator(chatty_llm_dir, max_new_tokens=12, batch_size=8)


def test_windows_overlap_and_cover_the_history():
    assert windows(25, 10, 5) == [(0, 10), (5, 15), (10, 20), (15, 25)]
    assert windows(7, 10, 5) == [(0, 7)]
    assert windows(0, 10, 5) == []
    assert windows(25, 10, 5, start=18) == [(18, 25)]
    with pytest.raises(ValueError, match="stride"):
        PreferenceConfig(window=5, stride=6)


def test_train_history_leaves_out_the_validation_and_test_items(dataset):
    histories = user_histories(dataset, "train")
    full = user_histories(dataset, "full")
    split = dataset.split()
    for train, everything, prefix in zip(histories, full, split.train, strict=True):
        np.testing.assert_array_equal(train.items, prefix)
        assert len(everything.items) == len(prefix) + 2


def test_each_step_reads_the_previous_summary_and_the_next_window(dataset, generator):
    config = PreferenceConfig(window=4, stride=2, max_words=12, first_build="full")
    history = user_histories(dataset)[0]
    lines = item_lines(dataset.catalog)
    [state] = summarise_users([history], lines, generator, config)
    steps = windows(len(history.items), 4, 2)
    assert len(generator.seen) == len(steps)
    first, second = generator.seen[0][-1]["content"], generator.seen[1][-1]["content"]
    assert "What we know" not in first
    assert lines[history.items[0]] in first and lines[history.items[4]] not in first
    assert "What we know" in second and lines[history.items[4]] in second
    assert state.watermark == len(history.items)
    assert 0 < len(state.preference.split()) <= 12
    assert "<|" not in state.preference


def test_an_update_reads_only_interactions_after_the_watermark(dataset, generator):
    config = PreferenceConfig(window=4, stride=2)
    lines = item_lines(dataset.catalog)
    user = user_histories(dataset, "full")[1]
    older = UserHistory(user.user_id, user.items[:-3], user.ratings[:-3])
    stored = PreferenceState(user.user_id, "likes dramas", len(older.items))
    [updated] = summarise_users([user], lines, generator, config, {user.user_id: stored})
    assert updated.watermark == len(user.items)
    prompts = [c[-1]["content"] for c in generator.seen]
    assert "likes dramas" in prompts[0]
    # the update's windows start `window - stride` items before the watermark
    listed = [[x for x in p.splitlines() if x.startswith("- ")] for p in prompts]
    expected = [
        [f"- {lines[i]}" for i in user.items[a:b]]
        for a, b in windows(len(user.items), 4, 2, start=stored.watermark - 2)
    ]
    assert listed == expected

    generator.seen.clear()
    [same] = summarise_users([older], lines, generator, config, {user.user_id: stored})
    assert same == stored and generator.seen == []  # nothing new: no LLM call at all


def test_clean_preference_drops_labels_repeats_and_special_tokens():
    config = PreferenceConfig(max_words=5)
    text = "Preference: loves <|im_end|> noir films and jazz age dramas\n\nsecond paragraph"
    assert clean_preference(text, config, ["<|im_end|>"]) == "loves ‹¦im_end¦› noir films and"
    looping = "Likes noir. They also like jazz. They also like jazz. They also like jazz."
    assert clean_preference(looping, PreferenceConfig()) == "Likes noir. They also like jazz."
    cycle = "This user enjoys action, drama, horror, crime, horror, crime, horror, crime, horror"
    assert cut_repetition(cycle) == "This user enjoys action, drama, horror, crime"


def test_a_killed_job_resumes_without_redoing_users(dataset, chatty_llm_dir, tmp_path, monkeypatch):
    histories = user_histories(dataset)
    lines = item_lines(dataset.catalog)
    spec = GeneratorSpec(model_dir=str(chatty_llm_dir), max_new_tokens=6)
    config = PreferenceConfig(window=6, stride=3)
    path = tmp_path / "prefs.jsonl"
    real_generate = TransformersGenerator.generate
    calls = {"n": 0}

    def dies_on_the_second_call(self, conversations):
        calls["n"] += 1
        if calls["n"] == 2:  # one generation per chunk of users on a first build
            raise KeyboardInterrupt  # the operator's Ctrl-C, or the machine going away
        return real_generate(self, conversations)

    monkeypatch.setattr(TransformersGenerator, "generate", dies_on_the_second_call)
    checkpoint = JsonlCheckpoint(path, "user_id", {"job": 1})
    with pytest.raises(KeyboardInterrupt):
        run_preferences(histories, lines, spec, config, checkpoint, chunk_users=2)
    done_before = [json.loads(line)["user_id"] for line in path.read_text().splitlines()]
    assert 0 < len(done_before) < len(histories)
    with path.open("a") as handle:
        handle.write('{"user_id": "torn')  # a crash in the middle of a write

    monkeypatch.setattr(TransformersGenerator, "generate", real_generate)
    resumed = JsonlCheckpoint(path, "user_id", {"job": 1})
    stats = run_preferences(histories, lines, spec, config, resumed, chunk_users=2)
    assert stats.resumed == len(done_before)
    assert stats.users == len(histories) - len(done_before)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["user_id"] for r in records) == sorted(h.user_id for h in histories)

    with pytest.raises(CheckpointMismatch):
        JsonlCheckpoint(path, "user_id", {"job": 2})


def test_the_job_writes_a_manifest_and_a_feature_store_file(dataset, chatty_llm_dir, tmp_path):
    spec = GeneratorSpec(model_dir=str(chatty_llm_dir), max_new_tokens=8)
    config = PreferenceConfig(window=6, stride=3)
    run_dir, stats, metrics = run_preferences_job(
        dataset, tmp_path, spec, config=config, max_users=3, checkpoint_every=2
    )
    assert (run_dir / "manifest.json").is_file() and not (run_dir / PARTIAL_FILE).exists()
    assert not (run_dir / "progress.json").exists()
    records = [
        json.loads(line) for line in (run_dir / "preferences.jsonl").read_text().splitlines()
    ]
    assert {tuple(sorted(r)) for r in records} == {("preference", "user_id", "watermark")}
    assert all(r["preference"] for r in records)
    assert metrics["users"] == 3 and stats.users_per_minute > 0

    # an incremental run over all users updates the stored ones and summarises the new ones
    later, _, metrics = run_preferences_job(
        dataset, tmp_path, spec, config=config, since=run_dir, checkpoint_every=4
    )
    states = read_preferences(later)
    assert len(states) == metrics["with_preference"]
    assert metrics["users_total"] == dataset.interactions.num_users


def test_max_history_bounds_the_first_summary_to_the_newest_items(dataset, generator):
    config = PreferenceConfig(window=4, stride=2, max_history=5, first_build="full")
    history = user_histories(dataset, "full")[2]
    lines = item_lines(dataset.catalog)
    [state] = summarise_users([history], lines, generator, config)
    listed = [
        [x for x in c[-1]["content"].splitlines() if x.startswith("- ")] for c in generator.seen
    ]
    start = len(history.items) - 5
    assert listed == [
        [f"- {lines[i]}" for i in history.items[a:b]]
        for a, b in windows(len(history.items), 4, 2, start=start)
    ]
    assert state.watermark == len(history.items)


def test_the_first_build_reads_only_the_newest_window_then_refreshes_by_watermark(
    dataset, generator
):
    config = PreferenceConfig(window=4, stride=2, max_words=60)
    lines = item_lines(dataset.catalog)
    histories = user_histories(dataset, "full")[:3]
    older = [UserHistory(h.user_id, h.items[:-3], h.ratings[:-3]) for h in histories]
    first = summarise_users(older, lines, generator, config)
    assert len(generator.seen) == len(older)  # one generation per user
    for history, conversation in zip(older, generator.seen, strict=True):
        listed = [x for x in conversation[-1]["content"].splitlines() if x.startswith("- ")]
        assert listed == [f"- {lines[i]}" for i in history.items[-4:]]
    assert [s.watermark for s in first] == [len(h.items) for h in older]
    assert all(len(s.preference.split()) <= 60 and "<|" not in s.preference for s in first)

    generator.seen.clear()
    stored = {s.user_id: s for s in first}
    refreshed = summarise_users(histories, lines, generator, config, stored)
    assert [s.watermark for s in refreshed] == [len(h.items) for h in histories]
    assert all("What we know" in c[-1]["content"] for c in generator.seen)  # the update path


def test_an_unknown_first_build_is_refused():
    with pytest.raises(ValueError, match="first_build"):
        PreferenceConfig(first_build="everything")

"""Feature records from a prepared dataset and the enrichment files (no server needed)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from feature_store.dataset import (
    load_captions,
    load_item_embeddings,
    load_preferences,
    load_sources,
    records_from_dataset,
)
from tandem.data import DataFormatError


def test_users_get_their_newest_history_oldest_first(tiny_dataset):
    users, items = records_from_dataset(tiny_dataset, history_cap=4)
    records = list(users)
    assert len(records) == len(users) == tiny_dataset.interactions.num_users
    sequence = tiny_dataset.interactions.sequences()[0]
    expected = tuple(tiny_dataset.catalog.id_of(sequence[-4:].tolist()))
    assert records[0].user_id == tiny_dataset.interactions.user_ids[0]
    assert records[0].history == expected
    assert records[0].preference is None and records[0].watermark == 0
    assert len(list(items)) == len(items) == tiny_dataset.catalog.num_items
    assert list(users) == records  # re-iterable: a resumed publish reads it again


def test_item_embeddings_are_taken_by_catalog_index(tiny_dataset):
    n = tiny_dataset.catalog.num_items
    table = np.arange((n + 1) * 3, dtype=np.float32).reshape(n + 1, 3)
    _, items = records_from_dataset(tiny_dataset, embeddings=table)
    first = next(iter(items))
    assert first.item_id == tiny_dataset.catalog.item_ids[0]
    np.testing.assert_array_equal(first.embedding, table[1])  # row 0 is padding
    with pytest.raises(ValueError, match="num_items"):
        records_from_dataset(tiny_dataset, embeddings=table[1:])


def test_enrichment_files_are_joined_and_unknown_rows_counted(tiny_dataset, tmp_path):
    n = tiny_dataset.catalog.num_items
    save_file({"embeddings": np.ones((n + 1, 5), np.float16)}, str(tmp_path / "emb.safetensors"))
    user = tiny_dataset.interactions.user_ids[1]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"user_id": user, "preference": "Loves dramas.", "watermark": 7}) + "\n\n"
        + json.dumps({"user_id": "ghost", "preference": "?"}) + "\n"
    )  # fmt: skip
    captions = tmp_path / "captions.parquet"
    pd.DataFrame({"item_id": ["i3", "zzz"], "caption": ["a poster", "?"]}).to_parquet(captions)
    sources = load_sources(
        tiny_dataset,
        embeddings_path=tmp_path / "emb.safetensors",
        preferences_path=prefs,
        captions_path=captions,
    )
    assert sources.embedding_dim == 5
    assert sources.skipped == {"preferences of unknown users": 1, "captions of unknown items": 1}
    by_user = {u.user_id: u for u in sources.users}
    assert (by_user[user].preference, by_user[user].watermark) == ("Loves dramas.", 7)
    by_item = {i.item_id: i for i in sources.items}
    assert by_item["i3"].caption == "a poster" and by_item["i4"].caption is None
    assert by_item["i4"].embedding.dtype == np.float32


def test_the_manifest_id_follows_the_content_of_the_inputs(tiny_dataset, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"item_id": "i1", "caption": "one"}) + "\n")
    first = load_sources(tiny_dataset, captions_path=captions).manifest_id
    assert load_sources(tiny_dataset, captions_path=captions).manifest_id == first
    assert first.startswith(f"synthetic@{tiny_dataset.summary.fingerprint}+cap:")
    captions.write_text(json.dumps({"item_id": "i1", "caption": "uno"}) + "\n")
    assert load_sources(tiny_dataset, captions_path=captions).manifest_id != first
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "enrich-42"}))
    assert "cap:enrich-42/" in load_sources(tiny_dataset, captions_path=captions).manifest_id


def test_bad_enrichment_files_say_what_and_where(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "1", "preference": "ok"}\n{broken\n')
    with pytest.raises(DataFormatError, match="row 2"):
        load_preferences(bad)
    bad.write_text('{"user_id": "1", "preference": ""}\n')
    with pytest.raises(DataFormatError, match="'preference'"):
        load_preferences(bad)
    bad.write_text('{"user_id": "1", "preference": "x", "watermark": "soon"}\n')
    with pytest.raises(DataFormatError, match="watermark"):
        load_preferences(bad)
    (tmp_path / "x.csv").write_text("item_id,caption\n")
    with pytest.raises(DataFormatError, match=r"\.jsonl or \.parquet"):
        load_captions(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_captions(tmp_path / "absent.jsonl")
    save_file({"vectors": np.ones((2, 2), np.float32)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(DataFormatError, match="no tensor 'embeddings'"):
        load_item_embeddings(tmp_path / "e.safetensors")
    save_file({"embeddings": np.ones(3, np.float32)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(DataFormatError, match="2-d float"):
        load_item_embeddings(tmp_path / "e.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DataFormatError, match="not a readable"):
        load_item_embeddings(tmp_path / "junk.safetensors")

"""MovieLens-100K from the copy bundled in the ``recbole`` package (no download).

943 users (with age, gender, occupation and zip code), 1,682 items, 100,000 ratings. Every
rating counts as an interaction, as in LlamaRec and MLLM4Rec. Titles are cleaned for prompts:
"Usual Suspects, The" -> "The Usual Suspects", and a trailing "(1995)" moves to the year.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd

from tandem.data.catalog import Catalog
from tandem.data.users import UserProfile, UserProfiles

_ARTICLE = re.compile(r"^(?P<title>.+), (?P<article>The|A|An|Il|La|Le|Les|L'|Das|Der|Die|El)$")
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


def bundled_movielens_dir() -> Path:
    """Folder with ml-100k.inter/.item/.user inside the installed recbole package (not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MovieLens-100K ships in the recbole package: "
            "pip install --no-deps recbole==1.2.1 (make install does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"{folder} lacks ml-100k.inter: is recbole==1.2.1 installed?")
    return folder


def clean_title(raw: str) -> tuple[str, int | None]:
    """Split a MovieLens title into (readable title, year or None)."""
    title, year = raw.strip(), None
    match = _YEAR.match(title)
    if match:
        title, year = match["title"], int(match["year"])
    match = _ARTICLE.match(title)
    if match:
        article = match["article"]
        title = f"{article}{'' if article.endswith(chr(39)) else ' '}{match['title']}"
    return title, year


def load_movielens_100k(folder: Path | None = None) -> tuple[Catalog, pd.DataFrame]:
    """Return the catalog and the raw interaction frame (user_id, item_id, timestamp, rating)."""
    folder = folder or bundled_movielens_dir()
    items = pd.read_csv(folder / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = [c.split(":")[0] for c in items.columns]
    titles, years = [], []
    for raw_title, raw_year in zip(items["movie_title"], items["release_year"], strict=True):
        title, year = clean_title(raw_title)
        titles.append(title)
        years.append(int(raw_year) if raw_year.isdigit() else year)
    genres = [tuple(g for g in c.split() if g != "unknown") for c in items["class"]]
    catalog = Catalog.from_records(
        item_ids=items["item_id"].tolist(), titles=titles, years=years, genres=genres
    )
    inter = pd.read_csv(folder / "ml-100k.inter", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter["timestamp"] = inter["timestamp"].astype("int64")
    return catalog, inter[["user_id", "item_id", "timestamp", "rating"]]


def load_movielens_users(folder: Path | None = None) -> UserProfiles:
    """Age, gender (M/F as given), occupation and zip code of every user, from ``.user``."""
    folder = folder or bundled_movielens_dir()
    users = pd.read_csv(folder / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    users.columns = [c.split(":")[0] for c in users.columns]
    return UserProfiles.from_profiles(
        UserProfile(
            user_id=row.user_id,
            age=int(row.age) if row.age.isdigit() else None,
            gender=row.gender or None,
            occupation=row.occupation or None,  # "none" is one of the file's occupations
            zip_code=row.zip_code or None,
        )
        for row in users.itertuples(index=False)
    )

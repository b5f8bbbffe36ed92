"""Catalog, interactions, user side features, loaders and the leave-one-out split."""

from tandem.data.catalog import PADDING_INDEX, Catalog, UnknownItemsError
from tandem.data.dataset import (
    DEFAULT_MIN_INTERACTIONS,
    Dataset,
    DataSummary,
    build_dataset,
    prepare_files,
    prepare_movielens_100k,
)
from tandem.data.errors import DataFormatError
from tandem.data.interactions import Interactions
from tandem.data.split import LeaveOneOutSplit, leave_one_out
from tandem.data.users import UserProfile, UserProfiles

__all__ = [
    "DEFAULT_MIN_INTERACTIONS",
    "PADDING_INDEX",
    "Catalog",
    "DataFormatError",
    "DataSummary",
    "Dataset",
    "Interactions",
    "LeaveOneOutSplit",
    "UnknownItemsError",
    "UserProfile",
    "UserProfiles",
    "build_dataset",
    "leave_one_out",
    "prepare_files",
    "prepare_movielens_100k",
]

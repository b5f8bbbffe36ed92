"""The ``TANDEM_VARIANTS`` setting: named ranker configurations and their traffic shares.

A variant overrides some of the gateway's ranker settings (backend, vLLM adapter, ranker run,
fusion weight, prompt switches); what it leaves unset comes from the gateway's own settings, so
a variant is exactly "the gateway as configured, except ...". The same shape is read from JSON
(``TANDEM_VARIANTS``) or from a YAML/JSON file (``TANDEM_VARIANTS_FILE``). Everything that can
be checked without loading a model is checked here, so a bad configuration stops start-up with
one clear message; runs and adapters are checked when the gateway loads them.

No variants configured = one implicit variant, ``default``, at 100%: the gateway as before.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feature_store.splits import Split, SplitVariant, VariantName

DEFAULT_VARIANT = "default"  # the one implicit variant when none are configured
OVERFLOW_LABEL = "other"  # metric label for a name outside the configured set (never expected)


class VariantConfig(BaseModel):
    """One named ranker configuration; None fields inherit the gateway's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: VariantName
    share: float = Field(0.0, ge=0.0, le=1.0)  # of served traffic; shadows have 0
    control: bool = False  # the variant others are compared with (default: the first served)
    shadow: bool = False  # scored off the response path, never served
    backend: Literal["inprocess", "vllm", "none"] | None = None
    adapter: str | None = None  # vLLM served adapter name, e.g. rec-v2 (backend vllm)
    run: Path | None = None  # ranker run folder (prompt config, projectors; in-process weights)
    rank_weight: float | None = Field(None, ge=0.0, le=1.0)
    prompt: dict[str, Any] | None = None  # PromptConfig fields to override, e.g. {"terse": true}
    deadline_ms: float = Field(2000, gt=0)  # a shadow's own scoring deadline
    concurrency: int = Field(2, ge=1)  # a shadow's concurrent scorings; more are skipped

    @model_validator(mode="after")
    def _check(self) -> VariantConfig:
        if self.adapter is not None and self.backend not in (None, "vllm"):
            raise ValueError(f"variant {self.name!r}: an adapter needs backend vllm")
        if self.prompt:
            from ranker.prompts import PromptConfig

            known = {f.name for f in fields(PromptConfig)}
            unknown = sorted(set(self.prompt) - known)
            if unknown:
                raise ValueError(
                    f"variant {self.name!r}: unknown prompt field(s) {unknown}; "
                    f"PromptConfig has {sorted(known)}"
                )
        return self


class VariantsConfig(BaseModel):
    """The variants and the assignment salt; validated as a split (shares, names, control)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    salt: str = Field("tandem", min_length=1, max_length=64)  # a new salt reshuffles users
    variants: tuple[VariantConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> VariantsConfig:
        controls = [v.name for v in self.variants if v.control]
        if len(controls) > 1:
            raise ValueError(f"only one variant can be the control, not {controls}")
        try:
            self.split()  # shares sum to 1, unique names, the control is served
        except ValidationError as exc:
            raise ValueError(problems(exc)) from None
        return self

    @property
    def control(self) -> str:
        marked = [v.name for v in self.variants if v.control]
        served = [v.name for v in self.variants if not v.shadow]
        return marked[0] if marked else (served[0] if served else self.variants[0].name)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str) -> VariantConfig:
        return next(v for v in self.variants if v.name == name)

    def split(self) -> Split:
        """The configured split (version 0: not yet stored in Redis)."""
        return Split(
            salt=self.salt,
            control=self.control,
            variants=tuple(
                SplitVariant(name=v.name, share=v.share, shadow=v.shadow, adapter=v.adapter)
                for v in self.variants
            ),
        )

    @classmethod
    def read(cls, path: Path) -> VariantsConfig:
        """A YAML or JSON file of this shape; ValueError names the file and the problem."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read TANDEM_VARIANTS_FILE {path}: {exc}") from None
        try:
            raw = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"TANDEM_VARIANTS_FILE {path}: {problems(exc)}") from None
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"TANDEM_VARIANTS_FILE {path}: {exc}") from None


def problems(exc: ValidationError) -> str:
    """A validation error as "where: what" phrases, without pydantic's input dumps."""

    def phrase(error: dict) -> str:
        where = ".".join(map(str, error["loc"]))
        what = error["msg"].removeprefix("Value error, ")
        return f"{where}: {what}" if where else what

    return "; ".join(phrase(e) for e in exc.errors())


def implicit_split() -> Split:
    """The split of a gateway without variants: ``default`` at 100%."""
    return Split(
        salt=DEFAULT_VARIANT,
        control=DEFAULT_VARIANT,
        variants=(SplitVariant(name=DEFAULT_VARIANT, share=1.0),),
    )

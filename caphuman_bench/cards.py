"""Method cards: small YAML files under `methods/`, validated strictly.

A card names its adapter, the weights it needs, its sampler settings and default parameters, and
named presets (e.g. `smoke`). An unknown or mistyped field is an error naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from caphuman_bench.errors import BenchError

CARDS_ENV = "CAPHUMAN_BENCH_CARDS"
DEFAULT_CARDS_DIR = Path(__file__).resolve().parents[1] / "methods"


class MethodCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    adapter: str
    description: str
    paper: str = ""
    weights: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)  # defaults: sampler settings, tau, switches, ...
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> overrides of params
    path: str = Field(default="", exclude=True)

    def card_hash(self) -> str:
        """sha256 of the card's content (not its location): part of every run's identity."""
        payload = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def resolve_params(self, preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
        params = dict(self.params)
        if preset is not None:
            if preset not in self.presets:
                raise BenchError(f"{self.path}: method {self.name!r} has no preset {preset!r}; presets: {', '.join(self.presets) or 'none'}")
            params.update(self.presets[preset])
        for key, value in overrides.items():
            if key not in params:
                raise BenchError(f"{self.path}: method {self.name!r} has no parameter {key!r}; parameters: {', '.join(sorted(params))}")
            params[key] = value
        return params


def cards_dir() -> Path:
    return Path(os.environ.get(CARDS_ENV, DEFAULT_CARDS_DIR))


def load_card(path: Path) -> MethodCard:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: method card not found") from None
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: a method card is a YAML mapping")
    try:
        card = MethodCard(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise BenchError(f"{path}: field {field!r}: {first['msg']}") from None
    return card.model_copy(update={"path": str(path)})


def all_cards(directory: Path | None = None) -> dict[str, MethodCard]:
    directory = directory or cards_dir()
    cards = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        card = load_card(path)
        if card.name in cards:
            raise BenchError(f"{path}: method name {card.name!r} already used by {cards[card.name].path}")
        cards[card.name] = card
    return cards


def get_card(name: str, directory: Path | None = None) -> MethodCard:
    cards = all_cards(directory)
    if name not in cards:
        raise BenchError(f"unknown method {name!r}; cards in {directory or cards_dir()}: {', '.join(cards) or 'none'}")
    return cards[name]

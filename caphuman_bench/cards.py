"""Method cards: small YAML files under `caphuman_bench/method_cards/` (and outside folders), validated strictly.

A card names its adapter, the weights it needs, its sampler settings and default parameters, and
named presets (e.g. `smoke`). An unknown or mistyped field is an error naming the file and field.
The keys and types of `params` are declared by the adapter (`MethodAdapter.param_types`) and checked
by `check_param_types` before a run is planned, so a typo never reaches generation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from caphuman_bench.errors import BenchError
from caphuman_bench.plugins import CARDS_ENV, outside_card_folders

__all__ = ["CARDS_ENV", "DEFAULT_CARDS_DIR", "MethodCard", "all_cards", "card_folders", "get_card", "load_card"]

DEFAULT_CARDS_DIR = Path(__file__).resolve().parent / "method_cards"
COMMAND_LINE = "the command line (--param, --tau, --no-global, --no-local)"
ParamTypes = dict[str, type | tuple[type, ...]]
# What a method may read of a task, and how the head condition reaches it (the leaderboard's `head input`).
MethodInput = Literal["reference", "prompt", "head"]
HeadInput = Literal["none", "normals", "landmarks", "3D render", "CapFace"]


class MethodCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    adapter: str
    description: str
    paper: str = ""
    inputs: list[MethodInput]  # which parts of a task the method uses; every method is scored on all metrics
    head_input: HeadInput  # how the head condition reaches the method; "none" when it ignores it
    weights: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)  # defaults: sampler settings, tau, switches, ...
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> overrides of params
    path: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _head_input_matches_inputs(self) -> "MethodCard":
        if (self.head_input != "none") != ("head" in self.inputs):
            raise ValueError(f"head_input {self.head_input!r} and inputs {self.inputs} disagree: "
                             "a method that uses the head condition names how (head_input), one that ignores it says 'none'")
        return self

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
                raise BenchError(f"{COMMAND_LINE}: method {self.name!r} ({self.path}) has no parameter {key!r}; "
                                 f"parameters: {', '.join(sorted(params))}")
            params[key] = value
        return params

    def check_param_types(self, param_types: ParamTypes, overrides: dict[str, Any] | None = None) -> None:
        """Every key of `params`, of each preset and of `overrides` is declared, with a value of its type.

        Card errors name the card file and field; override errors name the command line.
        """
        sources = [(f"{self.path}: field 'params.", self.params)]
        sources += [(f"{self.path}: field 'presets.{name}.", preset) for name, preset in self.presets.items()]
        sources.append((f"{COMMAND_LINE}: parameter '", overrides or {}))
        for where, values in sources:
            for key, value in values.items():
                if key not in param_types:
                    raise BenchError(f"{where}{key}': adapter {self.adapter!r} has no such parameter; "
                                     f"parameters: {', '.join(sorted(param_types))}")
                expected = param_types[key]
                if not _has_type(value, expected):
                    raise BenchError(f"{where}{key}': expected {_type_names(expected)}, got {value!r} ({type(value).__name__})")


def _has_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    """isinstance, except that bool is no int here and an int is a fine float."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def _type_names(expected: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))


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
        where = f"field {field!r}: " if field else ""
        raise BenchError(f"{path}: {where}{first['msg']}") from None
    return card.model_copy(update={"path": str(path)})


def _cards_in(directory: Path) -> dict[str, MethodCard]:
    cards = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        card = load_card(path)
        if card.name in cards:
            raise BenchError(f"{path}: method name {card.name!r} already used by {cards[card.name].path}")
        cards[card.name] = card
    return cards


def card_folders() -> list[Path]:
    """The package's cards, then the outside folders (`plugins`): entry points, --include, $CAPHUMAN_BENCH_CARDS."""
    return [DEFAULT_CARDS_DIR, *outside_card_folders()]


def all_cards(directory: Path | None = None) -> dict[str, MethodCard]:
    """Every card by name. An outside card of a shipped card's name replaces it (a user's edited copy);
    two outside cards of one name are an error naming both files."""
    if directory is not None:
        return _cards_in(directory)
    cards = _cards_in(DEFAULT_CARDS_DIR)
    outside: dict[str, MethodCard] = {}
    for folder in outside_card_folders():
        for name, card in _cards_in(folder).items():
            if name in outside:
                raise BenchError(f"{card.path}: method name {name!r} already used by {outside[name].path}")
            outside[name] = card
    return {**cards, **outside}


def get_card(name: str, directory: Path | None = None) -> MethodCard:
    cards = all_cards(directory)
    if name not in cards:
        folders = [directory] if directory is not None else card_folders()
        raise BenchError(f"unknown method {name!r}; cards in {', '.join(map(str, folders))}: {', '.join(cards) or 'none'}")
    return cards[name]

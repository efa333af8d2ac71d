"""Where the per-identity fine-tuned weights live, and when one may be used.

    <runs-dir>/finetune/<recipe>-<training hash>/
      class_images/<class prompt>/   DreamBooth's prior-preservation images (0000.jpg …, class_images.json)
      <identity>/
        <artefact file>    learned_embeds.safetensors | unet.safetensors | pytorch_lora_weights.safetensors
        finetune.json      written last: recipe, training parameters and hash, the reference photo's sha256,
                           the identity phrase, the artefact file's size and sha256, losses, time, versions

The training hash covers the recipe, every `train_*` parameter and `tiny`, so the plain and the
`_controlnet_head` card of one recipe share their artefacts, and a changed training setting trains anew
into another folder. An artefact counts only when its record is complete, was made from the same
reference photo and subject phrase ("a woman": its noun is in the training prompt), records the identity
phrase this configuration makes, and its file has the recorded sha256 and opens as safetensors;
anything else is trained again, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caphuman_bench.atomic import write_json_atomic
from caphuman_bench.errors import BenchError
from caphuman_bench.finetune.training import identity_phrase
from caphuman_bench.provenance import config_hash, package_versions
from caphuman_bench.weights import load_safetensors, sha256_of

ARTEFACT_FILES = {"textual_inversion": "learned_embeds.safetensors", "dreambooth": "unet.safetensors",
                  "lora": "pytorch_lora_weights.safetensors"}
RECORD_FILE = "finetune.json"
TRAINING_PREFIX = "train_"


def training_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a fine-tuned artefact depends on: every `train_*` one, and the base model (`tiny`)."""
    chosen = {k: v for k, v in params.items() if k.startswith(TRAINING_PREFIX)}
    chosen["tiny"] = bool(params.get("tiny", False))
    return dict(sorted(chosen.items()))


@dataclass(frozen=True)
class Artefact:
    """One identity's verified fine-tuned weights."""

    identity_id: str
    file: Path
    sha256: str
    record: dict

    def to_run_json(self, runs_dir: str | Path) -> dict:
        """What a run records: the path relative to the runs folder (which holds the run too, so the folder
        can move), the sha256 and the phrase that replaces the subject in the prompts."""
        return {"path": os.path.relpath(self.file, runs_dir), "sha256": self.sha256,
                "identity_phrase": self.record["identity_phrase"], "subject": self.record["subject"]}


class ArtefactStore:
    """The artefacts of one recipe and one training configuration."""

    def __init__(self, runs_dir: str | Path, recipe: str, params: dict[str, Any]) -> None:
        self.recipe = recipe
        self.params = training_params(params)
        self.training_hash = config_hash({"recipe": recipe, "params": self.params})
        self.root = Path(runs_dir) / "finetune" / f"{recipe}-{self.training_hash[:10]}"

    def class_images_folder(self, prompt: str) -> Path:
        """Shared by the identities whose class prompt it is ("a photo of woman")."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60]
        return self.root / "class_images" / f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"

    def folder(self, identity_id: str) -> Path:
        return self.root / identity_id

    def file(self, identity_id: str) -> Path:
        return self.folder(identity_id) / ARTEFACT_FILES[self.recipe]

    def verify(self, identity_id: str, reference_sha256: str, subject: str, *, full: bool) -> tuple[Artefact | None, str]:
        """The identity's artefact, or None and why not. `full` re-hashes the file; otherwise its size is
        compared with the record (cheap, for planning; the adapter re-hashes before it uses the file)."""
        record_path = self.folder(identity_id) / RECORD_FILE
        if not record_path.exists():
            return None, f"no artefact ({record_path} missing)"
        try:
            record = json.loads(record_path.read_text())
            expected = (record["recipe"], record["training_hash"], record["reference_sha256"], record["subject"])
            size, sha256 = int(record["size"]), str(record["sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{record_path}: unreadable record ({type(exc).__name__}: {exc})"
        if expected != (self.recipe, self.training_hash, reference_sha256, subject):
            return None, f"{record_path}: made for another recipe, training configuration, reference photo or subject phrase"
        phrase = identity_phrase(self.recipe, subject, self.params)
        if record.get("identity_phrase") != phrase:  # `run` puts the recorded phrase into every prompt
            return None, f"{record_path}: field 'identity_phrase' {record.get('identity_phrase')!r} is not {phrase!r}"
        path = self.file(identity_id)
        if not path.exists() or path.stat().st_size != size:
            return None, f"{path}: missing or not the recorded size ({size} bytes)"
        if full and sha256_of(path) != sha256:
            return None, f"{path}: sha256 differs from the record (corrupt or replaced)"
        try:  # opened, not only hashed: a record rewritten over junk bytes must not count
            load_safetensors(path, f"{self.recipe} weights", header_only=True)
        except BenchError as exc:
            return None, str(exc)
        return Artefact(identity_id, path, sha256, record), ""

    def clear(self, identity_id: str) -> None:
        """Remove an identity's record, then its artefact file (the record goes first: no half state counts)."""
        for path in (self.folder(identity_id) / RECORD_FILE, self.file(identity_id)):
            path.unlink(missing_ok=True)

    def write_record(self, identity_id: str, reference_sha256: str, subject: str, identity_phrase: str,
                     details: dict[str, Any]) -> Artefact:
        """Record the artefact file already written: its hash and how it was made. Written last."""
        path = self.file(identity_id)
        sha256 = sha256_of(path)
        record = {
            "recipe": self.recipe, "training_hash": self.training_hash, "training_params": self.params,
            "identity": identity_id, "reference_sha256": reference_sha256, "subject": subject,
            "identity_phrase": identity_phrase, "file": path.name, "size": path.stat().st_size, "sha256": sha256,
            **details, "environment": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json_atomic(self.folder(identity_id) / RECORD_FILE, record)
        return Artefact(identity_id, path, sha256, record)

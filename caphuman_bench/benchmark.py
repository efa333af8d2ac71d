"""The HumanIPHC benchmark spec: prompts, head conditions, identities and splits, read from
`caphuman_bench/benchmark_data/humaniphc/` (or a folder of the user's own files with the same names).

The paper did not release its lists; the shipped spec is a documented reconstruction (see the
folder's README). Everything is validated on load; errors name the file and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from caphuman_bench.errors import BenchError

DEFAULT_SPEC_DIR = Path(__file__).resolve().parent / "benchmark_data" / "humaniphc"
SPEC_ENV = "CAPHUMAN_BENCH_SPEC"
SPEC_FILES = ("VERSION", "prompts.yaml", "head_conditions.yaml", "identities.csv", "splits.yaml")
NEUTRAL_SUBJECT = "a person"  # what scoring puts in the placeholder (CLIP score, prompt accuracy)
PLACEHOLDER = "{subject}"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PACKAGE_IMAGE_RE = re.compile(r"^(skimage|matplotlib):[A-Za-z0-9][A-Za-z0-9_.-]*(~[a-z0-9]+)?$")

# DECA's coefficient sizes (decalib/deca.py, `param_dict`).
N_SHAPE, N_TEX, N_EXP, N_POSE, N_CAM, N_LIGHT = 100, 50, 50, 6, 3, 27


def euler_to_axis_angle(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation in degrees → the axis-angle vector DECA/FLAME use for the global pose.

    Convention (FLAME camera frame: x right, y up, z towards the camera): R = R_y(yaw) · R_x(pitch)
    · R_z(roll). Positive yaw turns the face to the subject's left (image right), positive pitch
    tilts the chin down, positive roll tilts the head counter-clockwise in the image.
    """
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_rotvec()


def axis_angle_to_euler(rotvec: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `euler_to_axis_angle`: (yaw, pitch, roll) in degrees."""
    from scipy.spatial.transform import Rotation

    yaw, pitch, roll = Rotation.from_rotvec(np.asarray(rotvec, dtype=np.float64)).as_euler("YXZ", degrees=True)
    return float(yaw), float(pitch), float(roll)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # contains the subject placeholder exactly once
    category: str

    def fill(self, subject: str) -> str:
        return self.text.replace(PLACEHOLDER, subject)


@dataclass
class HeadCondition:
    """A head condition as explicit DECA/FLAME parameters (the exact target of the head-control metric)."""

    id: str
    description: str
    yaw: float
    pitch: float
    roll: float
    pose: np.ndarray  # [6]: global axis-angle (3) + jaw axis-angle (3)
    exp: np.ndarray  # [50]
    cam: np.ndarray  # [3]: orthographic scale, tx, ty
    light: np.ndarray  # [9, 3] spherical-harmonics lighting
    pose_image: str | None = None  # alternatively: a photo whose DECA code defines the condition

    def coefficients(self) -> dict[str, np.ndarray]:
        return {"pose": self.pose, "exp": self.exp, "cam": self.cam, "light": self.light}


@dataclass(frozen=True)
class Identity:
    id: str
    subject: str  # phrase put into the prompt at generation time: "a woman", "a man", "a person"
    source: str  # celeba | package | folder
    file: str  # CelebA file name(s), or "skimage:astronaut" / "matplotlib:grace_hopper.jpg"; several: ';'-separated
    sha256: str = ""  # of each file, ';'-separated like `file` (prepared specs)
    licence: str = ""
    references: int = 1  # how many of its photos a method gets: 1, or k for the split-made identity "<id>@k"
    of: str = ""  # the identity whose photos these are, for "<id>@k"; "" for a row of identities.csv

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.file.split(";"))

    @property
    def photo_owner(self) -> str:
        return self.of or self.id

    def with_references(self, count: int) -> "Identity":
        """The identity seen with its first `count` photos, as the id "<id>@<count>" (a `references` split)."""
        return Identity(f"{self.id}@{count}", self.subject, self.source, self.file, self.sha256, self.licence, count, self.id)


@dataclass(frozen=True)
class Split:
    name: str
    identities: tuple[str, ...]
    prompts: tuple[str, ...]
    conditions: tuple[str, ...]
    samples: int
    references: tuple[int, ...] = ()  # a `references` split: each identity as "<id>@k" for each k


@dataclass
class Benchmark:
    root: Path
    version: str
    prompts: dict[str, Prompt]
    conditions: dict[str, HeadCondition]
    identities: dict[str, Identity]
    splits: dict[str, Split]
    identities_dir: Path | None = None  # folder of <identity>.jpg (prepared CelebA, or the user's own)
    _images: dict[str, Image.Image] = field(default_factory=dict, repr=False)
    _digests: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: str | os.PathLike | None = None, identities_dir: str | os.PathLike | None = None) -> "Benchmark":
        root = Path(root or os.environ.get(SPEC_ENV, DEFAULT_SPEC_DIR))
        if not root.is_dir():
            raise BenchError(f"{root}: benchmark spec folder not found")
        version = _read(root / "VERSION").strip()
        prompts = _load_prompts(root / "prompts.yaml")
        conditions = _load_conditions(root / "head_conditions.yaml")
        identities = _load_identities(root / "identities.csv")
        splits = _load_splits(root / "splits.yaml", prompts, conditions, identities)
        return cls(root, version, prompts, conditions, identities, splits, identities_folder(identities_dir))

    @classmethod
    def load_planned(cls, planned: dict, run_json: str | os.PathLike) -> "Benchmark":
        """The spec a run was planned with (its run.json's `benchmark` entry), refused when it no longer
        loads or its hash changed: what a run derives from the spec (tasks, scores, breakdowns) stays
        the spec's as the run was planned."""
        try:
            bench = cls.load(planned["spec_root"], identities_dir=planned.get("identities_dir"))
        except BenchError as exc:
            raise BenchError(f"the benchmark spec {run_json} was planned with does not load any more: {exc}") from None
        if bench.spec_hash != planned["spec_hash"]:
            raise BenchError(f"{bench.root}: the benchmark spec changed since {run_json} was written "
                             f"(field 'benchmark.spec_hash' {planned['spec_hash'][:12]} != {bench.spec_hash[:12]}); "
                             "restore the spec the run was planned with")
        return bench

    @cached_property
    def spec_hash(self) -> str:
        """sha256 over the spec files: two runs share a benchmark only if this matches."""
        return spec_files_hash(self.root)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise BenchError(f"{self.root / 'splits.yaml'}: unknown split {name!r}; splits: {', '.join(self.splits)}")
        return self.splits[name]

    def reference_image(self, identity_id: str) -> Image.Image:
        """The identity's (first) reference photo as RGB; errors name the identity and the file."""
        return self.reference_images(identity_id)[0]

    def reference_images(self, identity_id: str) -> list[Image.Image]:
        """The photos a method gets for this identity: the first, or the first k for "<id>@k"."""
        ident = self.identities[identity_id]
        return [self._photo(ident, n) for n in range(ident.references)]

    def reference_sha256(self, identity_id: str) -> str:
        """sha256 of the reference photos' RGB pixels and sizes: part of a run's identity, so a
        replaced photo makes another run, and the key of every per-identity cache."""
        if identity_id not in self._digests:
            h = hashlib.sha256()
            for n, image in enumerate(self.reference_images(identity_id)):
                h.update(f"{image.size}".encode() if n == 0 else f"|{n}|{image.size}".encode())
                h.update(image.tobytes())
            self._digests[identity_id] = h.hexdigest()
        return self._digests[identity_id]

    def _photo(self, ident: Identity, n: int) -> Image.Image:
        key = f"{ident.photo_owner}#{n}"
        if key not in self._images:
            self._images[key] = self._load_photo(ident, n)
        return self._images[key]

    def _load_photo(self, ident: Identity, n: int) -> Image.Image:
        """Photo n of an identity: a package image, or `identities/<id>.jpg` (n = 0) / `<id>.<n+1>.jpg`."""
        from caphuman_bench.images import ImageError, load_rgb

        owner, file = ident.photo_owner, ident.files[n]
        if ident.source == "package":
            return _package_image(owner, file)
        if self.identities_dir is None:
            raise BenchError(
                f"identity {owner!r} ({ident.source} file {file}) needs its photo: run "
                f"`caphuman-bench data prepare --celeba-root DIR` or pass --identities-dir DIR"
            )
        path = _inside(self.identities_dir, photo_file_name(owner, n))
        if not path.exists():
            raise BenchError(f"identity {owner!r}: reference photo {path} is missing")
        digests = ident.sha256.split(";") if ident.sha256 else []
        if digests:
            from caphuman_bench.weights import sha256_of

            digest = sha256_of(path)
            if digest != digests[n]:
                raise BenchError(f"identity {owner!r}: reference photo {path} has sha256 {digest[:12]}…, "
                                 f"{self.root / 'identities.csv'} field 'sha256' says {digests[n][:12]}…")
        try:
            return load_rgb(path)
        except ImageError as exc:
            raise BenchError(f"identity {owner!r}: reference photo {path}: {exc}") from None


def identities_folder(path: str | os.PathLike | None) -> Path | None:
    """`--identities-dir` checked when given, so a file or a typo is named at once, not at the first photo."""
    if not path:
        return None
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"--identities-dir {path}: {'not a folder' if path.exists() else 'no such folder'} "
                         f"(expected a folder of <identity>.jpg photos)")
    return path


def photo_file_name(identity_id: str, n: int) -> str:
    """Where a prepared identity's photo n lies in the identities folder: <id>.jpg, then <id>.2.jpg, ..."""
    return f"{identity_id}.jpg" if n == 0 else f"{identity_id}.{n + 1}.jpg"


# Variants of a package photo that stand in for further photos of the same person on the smoke preset
# (no package ships two photos of one person): "skimage:astronaut~mirror".
PACKAGE_VARIANTS = {
    "mirror": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    "crop90": lambda im: im.crop((round(im.width * 0.05), round(im.height * 0.05), round(im.width * 0.95), round(im.height * 0.95))),
    "crop80": lambda im: im.crop((round(im.width * 0.1), round(im.height * 0.1), round(im.width * 0.9), round(im.height * 0.9))),
    "dim": lambda im: im.point(lambda v: round(v * 0.8)),
}


def _package_image(identity_id: str, file: str) -> Image.Image:
    """Public-domain reference photos that ship inside installed packages (the demo split), or a variant."""
    file, _, variant = file.partition("~")
    if variant:
        if variant not in PACKAGE_VARIANTS:
            raise BenchError(f"identities.csv: identity {identity_id!r}: field 'file': unknown variant ~{variant}; "
                             f"variants: {', '.join(PACKAGE_VARIANTS)}")
        return PACKAGE_VARIANTS[variant](_package_image(identity_id, file))
    package, _, name = file.partition(":")
    unknown = BenchError(f"identities.csv: identity {identity_id!r}: field 'file' {file!r} is not an image shipped "
                         f"with {package or 'a package'}")
    if package == "skimage":
        from skimage import data

        bundled = any((Path(data.data_dir) / f"{name}{ext}").is_file() for ext in (".png", ".jpg"))
        if name not in getattr(data, "__all__", ()) or not callable(getattr(data, name, None)) or not bundled:
            raise unknown  # only images that ship in the wheel: never a download, never another function
        try:
            pixels = getattr(data, name)()
        except Exception:
            raise unknown from None
        if not isinstance(pixels, np.ndarray) or pixels.ndim not in (2, 3):
            raise unknown
        return Image.fromarray(pixels).convert("RGB")
    if package == "matplotlib":
        import matplotlib.cbook as cbook

        try:
            with cbook.get_sample_data(name) as fh:
                return Image.open(io.BytesIO(fh.read())).convert("RGB")
        except Exception:
            raise unknown from None
    raise unknown


def _inside(folder: Path, name: str) -> Path:
    """`folder/name`, refusing names that would leave the folder."""
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise BenchError(f"{folder}: file name {name!r} leaves its folder")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise BenchError(f"{path}: file missing from the benchmark spec") from None


def spec_files_hash(root: Path) -> str:
    """sha256 over a spec folder's files, read without parsing them (`Benchmark.spec_hash`)."""
    h = hashlib.sha256()
    for name in SPEC_FILES:
        h.update(name.encode() + b"\0" + (Path(root) / name).read_bytes())
    return h.hexdigest()


def _yaml(path: Path):
    try:
        return yaml.safe_load(_read(path))
    except yaml.YAMLError as exc:  # its own message spans several lines: the place and the problem only
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise BenchError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or ' '.join(str(exc).split())}") from None


def _check_id(path: Path, value, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BenchError(f"{path}: {what} id {value!r} must be letters, digits, '_', '-', '.'")
    return value


def _load_prompts(path: Path) -> dict[str, Prompt]:
    raw = _yaml(path)
    rows = raw.get("prompts") if isinstance(raw, dict) else None
    if not isinstance(rows, list):
        raise BenchError(f"{path}: expected a mapping with a 'prompts' list")
    prompts = {}
    for i, row in enumerate(rows):
        where = f"{path}: prompts[{i}]"
        if not isinstance(row, dict) or set(row) != {"id", "text", "category"}:
            raise BenchError(f"{where}: fields must be exactly id, text, category (got {sorted(row) if isinstance(row, dict) else row!r})")
        pid = _check_id(path, row["id"], "prompt")
        for name in ("text", "category"):
            if not isinstance(row[name], str):
                raise BenchError(f"{where} ({pid}): field {name!r} must be a string, got {type(row[name]).__name__}")
        if row["text"].count(PLACEHOLDER) != 1:
            raise BenchError(f"{where} ({pid}): field 'text' must contain {PLACEHOLDER} exactly once")
        if pid in prompts:
            raise BenchError(f"{where}: duplicate prompt id {pid!r}")
        prompts[pid] = Prompt(pid, row["text"], str(row["category"]))
    return prompts


def _vector(where: str, name: str, value, size: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BenchError(f"{where}: field {name!r} must be {size} numbers") from None
    if arr.size != size:
        raise BenchError(f"{where}: field {name!r} needs {size} numbers, got {arr.size}")
    if not np.isfinite(arr).all():
        raise BenchError(f"{where}: field {name!r} has a value that is not a finite number")
    return arr.reshape(-1)


# The range in which yaw, pitch and roll name each head rotation once (YXZ Euler angles, pitch within ±90°):
# yaw 720 would be rendered frontal but binned as |yaw| ≥ 60°.
ANGLE_LIMITS = {"yaw": 180.0, "pitch": 90.0, "roll": 180.0}


def _degrees(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BenchError(f"{where}: field {name!r} must be a finite number (degrees), got {value!r}")
    if abs(value) > ANGLE_LIMITS[name]:
        raise BenchError(f"{where}: field {name!r} {value!r} is outside -{ANGLE_LIMITS[name]:g}..{ANGLE_LIMITS[name]:g} degrees")
    return float(value)


def _load_conditions(path: Path) -> dict[str, HeadCondition]:
    raw = _yaml(path)
    rows = raw.get("conditions") if isinstance(raw, dict) else None
    if not isinstance(rows, list):
        raise BenchError(f"{path}: expected a mapping with a 'conditions' list")
    allowed = {"id", "description", "yaw", "pitch", "roll", "global_axis_angle", "jaw", "exp", "cam", "light", "pose_image"}
    conditions = {}
    for i, row in enumerate(rows):
        where = f"{path}: conditions[{i}]"
        if not isinstance(row, dict):
            raise BenchError(f"{where}: expected a mapping")
        unknown = set(row) - allowed
        if unknown:
            raise BenchError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        cid = _check_id(path, row.get("id"), "condition")
        where = f"{where} ({cid})"
        yaw, pitch, roll = (_degrees(where, k, row.get(k, 0.0)) for k in ("yaw", "pitch", "roll"))
        glob = euler_to_axis_angle(yaw, pitch, roll)
        if "global_axis_angle" in row:
            stored = _vector(where, "global_axis_angle", row["global_axis_angle"], 3)
            if np.abs(stored - glob).max() > 1e-4:
                raise BenchError(f"{where}: field 'global_axis_angle' {stored.tolist()} disagrees with yaw/pitch/roll ({glob.round(6).tolist()})")
        jaw = _vector(where, "jaw", row.get("jaw", [0, 0, 0]), 3)
        exp = _vector(where, "exp", row.get("exp", [0.0] * N_EXP), N_EXP)
        cam = _vector(where, "cam", row.get("cam"), N_CAM) if "cam" in row else None
        light = _vector(where, "light", row.get("light"), N_LIGHT) if "light" in row else None
        if cam is None or light is None:
            raise BenchError(f"{where}: fields 'cam' and 'light' are required")
        if cam[0] <= 0:
            raise BenchError(f"{where}: field 'cam' must start with a positive orthographic scale, got {cam[0]}")
        if not isinstance(row.get("pose_image"), (str, type(None))):
            raise BenchError(f"{where}: field 'pose_image' must be a file name")
        if cid in conditions:
            raise BenchError(f"{where}: duplicate condition id")
        pose_image = None
        if row.get("pose_image"):  # relative to the spec folder; read by the head-render methods
            pose_image = (path.parent / str(row["pose_image"])).resolve()
            if not pose_image.is_file():
                raise BenchError(f"{where}: field 'pose_image': file {pose_image} not found")
        conditions[cid] = HeadCondition(
            cid, str(row.get("description", "")), yaw, pitch, roll,
            np.concatenate([glob, jaw]), exp, cam, light.reshape(9, 3), str(pose_image) if pose_image else None,
        )
    return conditions


def _load_identities(path: Path) -> dict[str, Identity]:
    text = _read(path)
    reader = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    needed = {"id", "subject", "source", "file", "sha256", "licence"}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise BenchError(f"{path}: header must have columns {', '.join(sorted(needed))}")
    identities = {}
    for line, row in enumerate(reader, start=2):
        iid = _check_id(path, row["id"], "identity")
        if row["source"] not in {"celeba", "package", "folder"}:
            raise BenchError(f"{path}: row {line} ({iid}): field 'source' must be celeba, package or folder")
        files = (row["file"] or "").split(";")
        for file in files:
            if not file or "/" in file or "\\" in file or file.startswith(".."):
                raise BenchError(f"{path}: row {line} ({iid}): field 'file' {row['file']!r} must be bare file names, ';'-separated")
            if row["source"] == "package" and not _PACKAGE_IMAGE_RE.match(file):
                raise BenchError(f"{path}: row {line} ({iid}): field 'file' {file!r} must be skimage:<image name> "
                                 f"or matplotlib:<sample file> (optionally ~variant)")
        if row["sha256"] and len(row["sha256"].split(";")) != len(files):
            raise BenchError(f"{path}: row {line} ({iid}): field 'sha256' lists {len(row['sha256'].split(';'))} digests "
                             f"for {len(files)} files")
        if not (row["subject"] or "").strip():
            raise BenchError(f"{path}: row {line} ({iid}): field 'subject' is empty")
        if iid in identities:
            raise BenchError(f"{path}: row {line}: duplicate identity id {iid!r}")
        identities[iid] = Identity(iid, row["subject"], row["source"], row["file"], row["sha256"], row["licence"])
    return identities


def _load_splits(path, prompts, conditions, identities) -> dict[str, Split]:
    raw = _yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("splits"), dict):
        raise BenchError(f"{path}: expected a mapping with a 'splits' mapping")
    pools = {"identities": identities, "prompts": prompts, "conditions": conditions}
    splits, made = {}, {}
    for name, row in raw["splits"].items():
        where = f"{path}: split {name!r}"
        if not isinstance(row, dict) or set(row) - {*pools, "samples", "description", "references"}:
            raise BenchError(f"{where}: fields are identities, prompts, conditions, samples, references, description")
        chosen = {}
        for key, pool in pools.items():
            value = row.get(key, "all")
            if value == "all":
                chosen[key] = tuple(pool)
            elif isinstance(value, str) and value.split(":")[0] == "prepared" and key == "identities":
                prepared = [k for k, v in pool.items() if v.source != "package"]  # CelebA or a folder of faces
                count = value.partition(":")[2]
                if count and not re.fullmatch(r"[0-9]+", count):
                    raise BenchError(f"{where}: field {key!r}: {value!r} must be prepared or prepared:N")
                chosen[key] = tuple(prepared[: int(count)] if count else prepared)
            elif isinstance(value, list):
                if not all(isinstance(v, str) for v in value):
                    raise BenchError(f"{where}: field {key!r}: every id must be a string")
                unknown = [v for v in value if v not in pool]
                if unknown:
                    raise BenchError(f"{where}: field {key!r} names unknown id(s) {', '.join(map(str, unknown))}")
                _check_unique(where, key, value)
                chosen[key] = tuple(value)
            else:
                raise BenchError(f"{where}: field {key!r} must be 'all', 'prepared', 'prepared:N' or a list of ids")
        samples = row.get("samples", 3)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise BenchError(f"{where}: field 'samples' must be a positive integer")
        counts = row.get("references", [])
        if not isinstance(counts, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in counts):
            raise BenchError(f"{where}: field 'references' must be a list of positive integers (photos per identity)")
        _check_unique(where, "references", counts)
        if counts:  # each identity once per count, as "<id>@k" with its first k photos
            expanded = []  # identities with fewer photos than the largest k are left out of this split
            enough = [i for i in chosen["identities"] if len(identities[i].files) >= max(counts)]
            if chosen["identities"] and not enough:
                few = ", ".join(f"{i} ({len(identities[i].files)})" for i in chosen["identities"][:5])
                raise BenchError(f"{where}: field 'references' asks for {max(counts)} photos per identity, and no identity "
                                 f"of the split has that many (photos: {few}{', …' if len(chosen['identities']) > 5 else ''})")
            for iid in enough:
                for k in counts:
                    made[f"{iid}@{k}"] = identities[iid].with_references(k)
                    expanded.append(f"{iid}@{k}")
            chosen["identities"] = tuple(expanded)
        splits[name] = Split(name, chosen["identities"], chosen["prompts"], chosen["conditions"], samples, tuple(counts))
    identities.update(made)  # after every split chose from the rows of identities.csv
    return splits


def _check_unique(where: str, key: str, values: list) -> None:
    """A split lists each id (and each photo count) once: a repeat would plan one task twice."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise BenchError(f"{where}: field {key!r} lists {', '.join(repeated)} more than once")

"""Reading the FLAME files a user downloads after registering: `generic_model.pkl`, `FLAME_texture.npz`
and DECA's `head_template.obj`.

`generic_model.pkl` is a Python-2 pickle whose `shapedirs` is a chumpy array. chumpy does not
import on Python 3.11 / numpy 1.26, and a plain `pickle.load` would run whatever the file names, so
it is read by a restricted unpickler: only the classes such a file contains are resolved (numpy
arrays and dtypes, scipy's CSC matrix, chumpy's `Ch`, `set`), chumpy and scipy objects are
replaced by numpy arrays, and any other class is refused — before it is called — with a
`BenchError` naming it.
"""

from __future__ import annotations

import codecs
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caphuman_bench.errors import BenchError

# Fields DECA's FLAME layer reads from generic_model.pkl.
FLAME_FIELDS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")


class _ChumpyArray:
    """What a `chumpy.ch.Ch` becomes while unpickling: keeps the state, whose 'x' is the array."""

    def __setstate__(self, state):
        self.state = state

    def to_numpy(self, where: str) -> np.ndarray:
        value = self.state.get("x") if isinstance(self.state, dict) else None
        if not isinstance(value, np.ndarray):
            raise BenchError(f"{where}: chumpy array without its values (state field 'x')")
        return value


class _CscMatrix:
    """What a scipy CSC matrix becomes while unpickling; rebuilt from its arrays, not its class."""

    def __setstate__(self, state):
        self.state = state

    def to_numpy(self, where: str) -> np.ndarray:
        from scipy.sparse import csc_matrix

        s = self.state if isinstance(self.state, dict) else {}
        shape = s.get("_shape", s.get("shape"))
        if not all(isinstance(s.get(k), np.ndarray) for k in ("data", "indices", "indptr")) or shape is None:
            raise BenchError(f"{where}: sparse matrix without data/indices/indptr/shape")
        return csc_matrix((s["data"], s["indices"], s["indptr"]), shape=tuple(shape)).toarray()


_STAND_INS = (_ChumpyArray, _CscMatrix)


def _reconstructor(cls, base, state):
    """`copy_reg._reconstructor` (protocol 0/1 pickles), limited to the classes allowed here."""
    if cls not in _STAND_INS or base is not object or state is not None:
        raise BenchError(f"pickle asks to rebuild {getattr(cls, '__name__', cls)!r}, which a FLAME file never does")
    return object.__new__(cls)


def _allowed_classes() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray

    allowed = {
        ("chumpy.ch", "Ch"): _ChumpyArray,
        ("copy_reg", "_reconstructor"): _reconstructor,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("__builtin__", "object"): object,
        ("builtins", "object"): object,
        ("__builtin__", "set"): set,
        ("builtins", "set"): set,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "ndarray")] = np.ndarray
        allowed[(module, "dtype")] = np.dtype
    for module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse"):
        allowed[(module, "csc_matrix")] = _CscMatrix
    return allowed


class _FlameUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="latin1")
        self._allowed = _allowed_classes()
        self._path = path

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise BenchError(
                f"{self._path}: refused to unpickle class {module}.{name} — a FLAME generic_model.pkl only "
                f"holds numpy arrays, scipy sparse matrices and chumpy arrays"
            ) from None


def _plain(value, where: str):
    if isinstance(value, _STAND_INS):
        return value.to_numpy(where)
    return value


def load_flame_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """FLAME's `generic_model.pkl` as a dict of numpy arrays (no chumpy, no arbitrary code)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = _FlameUnpickler(fh, path).load()
    except FileNotFoundError:
        raise BenchError(f"{path}: FLAME model file not found") from None
    except BenchError:
        raise
    except Exception as exc:  # truncated or foreign file: the unpickler's own error, named
        raise BenchError(f"{path}: not a readable FLAME pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: expected a dict of FLAME fields, got {type(raw).__name__}")
    model = {key: _plain(value, f"{path}: field {key!r}") for key, value in raw.items()}
    missing = [k for k in FLAME_FIELDS if k not in model]
    if missing:
        raise BenchError(f"{path}: FLAME field(s) missing: {', '.join(missing)}")
    for key in FLAME_FIELDS:
        if not isinstance(model[key], np.ndarray):
            raise BenchError(f"{path}: field {key!r} should be an array, got {type(model[key]).__name__}")
    return model


@dataclass(frozen=True)
class TextureSpace:
    """FLAME's linear albedo model: mean + basis · tex, flattened (side × side × 3, BGR), in [0, 1]."""

    mean: np.ndarray  # [side*side*3]
    basis: np.ndarray  # [side*side*3, n_tex]
    side: int


def load_texture_space(path: str | os.PathLike, n_tex: int = 50) -> TextureSpace:
    """`FLAME_texture.npz` ('mean', 'tex_dir', values 0–255) → the first `n_tex` components, scaled to [0, 1]
    as DECA's `FLAMETex` does."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "mean" not in npz or "tex_dir" not in npz:
                raise BenchError(f"{path}: needs arrays 'mean' and 'tex_dir' (has {', '.join(npz.files)})")
            mean = np.asarray(npz["mean"], dtype=np.float32).reshape(-1)
            tex_dir = npz["tex_dir"]
    except FileNotFoundError:
        raise BenchError(f"{path}: FLAME texture file not found") from None
    except (ValueError, OSError) as exc:
        raise BenchError(f"{path}: not a readable .npz ({exc})") from None
    if tex_dir.size % mean.size or tex_dir.size // mean.size < n_tex:
        raise BenchError(f"{path}: field 'tex_dir' {tex_dir.shape} must hold ≥ {n_tex} components of {mean.size} values")
    basis = np.asarray(tex_dir.reshape(mean.size, -1)[:, :n_tex], dtype=np.float32)
    side = int(round((mean.size / 3) ** 0.5))
    if side * side * 3 != mean.size:
        raise BenchError(f"{path}: field 'mean' has {mean.size} values, not a square RGB texture")
    return TextureSpace(mean / 255.0, basis / 255.0, side)


@dataclass(frozen=True)
class UVLayout:
    """Texture coordinates of the FLAME topology: `uv` [T, 2] in [0, 1] (v up) and per-face indices into it.

    From an .obj also its own faces (vertex indices) and vertex count: DECA's `SRenderY` draws with the
    obj's faces (pytorch3d `load_obj(...).verts_idx`), not FLAME's `f`."""

    uv: np.ndarray  # float32 [T, 2]
    uv_faces: np.ndarray  # int64 [F, 3]
    faces: np.ndarray | None = None  # int64 [F, 3] vertex indices; None: FLAME's own
    n_vertices: int | None = None  # 'v' lines of the obj


def load_uv_layout(path: str | os.PathLike) -> UVLayout:
    """`vt`, and the vertex and texture indices of the `f v/vt[/vn]` lines, of DECA's `head_template.obj`."""
    path = Path(path)
    uv, uv_faces, faces, n_vertices = [], [], [], 0
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise BenchError(f"{path}: head template .obj not found") from None
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                n_vertices += 1
            elif parts[0] == "vt":
                uv.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "f":
                if len(parts) != 4:
                    raise BenchError(f"{path}: line {number}: only triangles are supported")
                uv_faces.append([int(p.split("/")[1]) - 1 for p in parts[1:]])
                faces.append([int(p.split("/")[0]) - 1 for p in parts[1:]])
        except (IndexError, ValueError):
            raise BenchError(f"{path}: line {number}: malformed {parts[0]!r} line (faces need v/vt indices)") from None
    if not uv or not uv_faces:
        raise BenchError(f"{path}: no 'vt' texture coordinates or no faces")
    uv_faces = np.asarray(uv_faces, dtype=np.int64)
    if uv_faces.min() < 0 or uv_faces.max() >= len(uv):
        raise BenchError(f"{path}: face texture index outside the {len(uv)} 'vt' entries")
    faces = np.asarray(faces, dtype=np.int64)
    if faces.min() < 0 or faces.max() >= n_vertices:
        raise BenchError(f"{path}: face vertex index outside the {n_vertices} 'v' entries")
    return UVLayout(np.asarray(uv, dtype=np.float32), uv_faces, faces, n_vertices)

"""Every weights file a full `caphuman` run and its scoring need, in the official layouts, with seeded
random values: a full-size run anywhere, with no download and no licence. Never commit the output.

    python benchmarks/make_random_weights.py --out /tmp/weights            # full size (≈ 9 GB in float32)
    CAPHUMAN_BENCH_WEIGHTS=/tmp/weights caphuman-bench run --method caphuman ...

| file (manifest id) | layout written | read by |
|---|---|---|
| caphuman.ckpt (caphuman_ckpt) | Lightning checkpoint `{"state_dict": …}` with the official 1880 keys, shapes and dtypes (`tests/data/caphuman_full_layout.tsv`, read off the release) | `convert_caphuman.load_caphuman_components` |
| 20180402-114759-vggface2.pt (facenet_vggface2) | facenet-pytorch `InceptionResnetV1` state dict with the 8631-way `logits` | `identity_encoder.load_facenet` |
| 79999_iter.pth (face_parser_bisenet) | face-parsing.PyTorch BiSeNet state dict | `face_parser.FaceParser.from_file` |
| open_clip_vit_l14_openai.bin (clip_vit_l14_openai) | open_clip `ViT-L-14` state dict | `metrics/_clip.load_clip` |
| deca_model.tar (deca_model) | `{"E_flame": ResnetEncoder(outsize=236) state dict}` (`tests/data/deca_encoder_layout.tsv`); the real file's `E_detail` / `D_detail` are not read by anything here and not written | `deca_encoder.load_deca_encoder` |
| EMOCA_v2_lr_mse_20/ (emoca_v2) | the release folder: `cfg.yaml` and `detail/checkpoints/…/*.ckpt`, a Lightning checkpoint whose `state_dict` holds `deca.E_flame.*` and `deca.E_expression.*` (ExpDECA, jaw from E_expression); the real checkpoint's detail and loss networks are not read by anything here and not written | `emoca.load_emoca` |
| SMIRK_em1.pt (smirk) | the release's flat state dict, `smirk_encoder.*` keys (timm MobileNetV3 trunks + heads, `models/smirk.random_smirk_checkpoint`: batch-norm statistics and scales drawn too); the release's `smirk_generator.*` are not read by anything here and not written | `smirk.load_smirk_encoder` |
| 2DFAN4-cd938726ad.zip (fan_2dfan4) | TorchScript archive of face_alignment's 2DFAN-4 (`models/fan.py`: 4 stacks, 23.8 M parameters, ≈ 92 MiB), traced: [B, 3, 256, 256] → [B, 68, 64, 64] | `faces.landmarks.load_fan` |
| generic_model.pkl, FLAME_texture.npz, head_template.obj (flame_*) | the FLAME-format synthetic head (`render/synthetic.py`) at FLAME's size: ≈5k vertices, ≈10k triangles, 512² texture | `render.flame_io` loaders |

Not written: the optional `realistic_vision_v3` / `vae_ft_mse` overlays and `clip_vit_b32_openai`,
ArcFace's `glintr100.onnx` (an ONNX graph, not a state dict) and the `ip_adapter_controlnet` files;
MTCNN, dlib and MediaPipe ship inside their packages.

Values: norm scales 1, biases 0, batch-norm running variances 1, other tensors N(0, 1/fan_in) (so
activations stay O(1) through the deep networks and half precision does not overflow); the DDPM
schedule buffers are the real ones (the loader checks them). The exception is FAN: its unnormalised residual
sums over 4 stacked hourglasses grow the heatmaps to ~1e4 (max ~4e4 on a uniform-noise input), fine in the
float32 the archive holds and runs in, but not O(1). `--layout tiny` writes caphuman.ckpt
in the layout of the conformance vectors' tiny model (`tests/data/caphuman_tiny`) and a FAN of width 16,
one stack (`FAN_TINY`) for CPU tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data"
FULL_LAYOUT = DATA / "caphuman_full_layout.tsv"
TINY_DIR = DATA / "caphuman_tiny"
DECA_LAYOUT = DATA / "deca_encoder_layout.tsv"
FLAME_SIZE = {"n_lat": 71, "n_lon": 72, "texture_side": 512}  # ≈ FLAME 2020: 5023 vertices, 9976 triangles
FAN_TINY = {"stacks": 1, "depth": 4, "width": 16}


def _tsv_layout(path: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return {r["key"]: ([int(v) for v in r["shape"].strip("[]").split(",") if v.strip()], getattr(torch, r["dtype"])) for r in rows}


def _safetensors_layout(path: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}.get(name) or getattr(torch, str(name))


def random_tensor(key: str, shape: list[int], dtype: torch.dtype, generator: torch.Generator | None, device: str) -> torch.Tensor:
    """A plausible random value for a parameter named `key` (see the module docstring)."""
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if key.endswith("position_ids"):  # transformers 4 CLIP buffer: an arange (the loader checks it)
        return torch.arange(shape[-1], dtype=dtype, device=device).expand(shape).clone()
    if dtype == torch.int64:  # batch-norm counters
        return torch.zeros(shape, dtype=dtype, device=device)
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("running_var",):
        return torch.ones(shape, dtype=dtype, device=device)
    if leaf in ("running_mean", "bias") or (len(shape) == 1 and leaf.endswith("bias")):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) <= 1:  # norm scales (and the odd 1-D parameter)
        return torch.ones(shape, dtype=dtype, device=device)
    fan_in = math.prod(shape[1:])
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(fan_in)
    return values.to(dtype)


def random_state_dict(layout: dict[str, tuple[list[int], torch.dtype]], seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = None if device == "meta" else torch.Generator(device=device).manual_seed(seed)
    state = {key: random_tensor(key, shape, _dtype(dtype), generator, device) for key, (shape, dtype) in layout.items()}
    return state if device == "meta" else {k: v.cpu() for k, v in state.items()}  # files hold CPU tensors


def _with_schedule(state: dict[str, torch.Tensor], hparams: dict, device: str) -> dict[str, torch.Tensor]:
    """The real DDPM schedule buffers (the converter checks them against the hparams)."""
    from caphuman_bench.loaders.convert_caphuman import schedule_buffers

    if device == "meta":
        return state
    for name, values in schedule_buffers(hparams).items():
        if name in state:
            state[name] = torch.from_numpy(np.asarray(values)).to(state[name].dtype)
    return state


def caphuman_state_dict(layout: str = "full", seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    from caphuman_bench.loaders.convert_caphuman import SD15_HPARAMS

    if layout == "full":
        keys, hparams = _tsv_layout(FULL_LAYOUT), SD15_HPARAMS
    else:
        keys, hparams = _safetensors_layout(TINY_DIR / "state_dict.safetensors"), tiny_hparams()
    state = random_state_dict(keys, seed, device)
    return _with_schedule(state, hparams, device)


def tiny_hparams() -> dict:
    return json.loads((TINY_DIR / "hparams.json").read_text())


def _module_state(build, seed: int, device: str) -> dict[str, torch.Tensor]:
    """A freshly built module's state dict with our random values (its own init is skipped on meta)."""
    with torch.device("meta"):
        module = build()
    layout = {k: (list(v.shape), v.dtype) for k, v in module.state_dict().items()}
    return random_state_dict(layout, seed, device)


def facenet_state_dict(seed: int = 1, device: str = "cpu") -> dict[str, torch.Tensor]:
    from facenet_pytorch import InceptionResnetV1

    def build():
        model = InceptionResnetV1(pretrained=None, classify=False)
        model.logits = torch.nn.Linear(512, 8631)  # the vggface2 file carries its classifier
        return model

    return _module_state(build, seed, device)


def bisenet_state_dict(seed: int = 2, device: str = "cpu") -> dict[str, torch.Tensor]:
    from caphuman_bench.models.face_parser import BiSeNet

    return _module_state(BiSeNet, seed, device)


def open_clip_state_dict(name: str = "ViT-L-14", seed: int = 3, device: str = "cpu") -> dict[str, torch.Tensor]:
    import open_clip

    state = _module_state(lambda: open_clip.create_model(name, pretrained=None, force_quick_gelu=True, device="meta"), seed, device)
    if device != "meta":  # a sane temperature; attention masks are buffers rebuilt at load
        state["logit_scale"] = torch.tensor(math.log(100.0))
    return state


def deca_state_dict(seed: int = 4, device: str = "cpu") -> dict[str, torch.Tensor]:
    return random_state_dict(_tsv_layout(DECA_LAYOUT), seed, device)


def write_fan(path: Path, layout: str = "full", seed: int = 6, device: str = "cpu") -> None:
    """2DFAN-4 with random values (by role, as every file here) as the TorchScript archive face_alignment ships."""
    from caphuman_bench.models.fan import FAN, fan_archive

    build = (lambda: FAN(**FAN_TINY)) if layout == "tiny" else FAN
    net = build()
    net.load_state_dict(_module_state(build, seed, device), strict=True)
    fan_archive(net, path)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a release folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def write_all(out: Path, layout: str = "full", seed: int = 0, dtype: torch.dtype = torch.float32, only: list[str] | None = None,
              device: str = "cpu") -> dict[str, Path]:
    """Write the files (by manifest id) into `out`; returns {weights id: path}."""
    from caphuman_bench import weights
    from caphuman_bench.models.emoca import random_state_dict as random_emoca_state_dict
    from caphuman_bench.models.emoca import write_release as write_emoca_release
    from caphuman_bench.models.smirk import write_random_smirk_checkpoint
    from caphuman_bench.render.synthetic import write_synthetic_flame

    out.mkdir(parents=True, exist_ok=True)
    path = lambda wid: out / weights.entry(wid).file  # noqa: E731
    from caphuman_bench.loaders.convert_caphuman import SCHEDULE_BUFFERS

    # the schedule buffers stay float32 (the loader compares them with the hparams to 1e-6)
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v for k, v in sd.items()}  # noqa: E731
    writers = {
        "caphuman_ckpt": lambda: torch.save({"state_dict": cast(caphuman_state_dict(layout, seed, device))}, path("caphuman_ckpt")),
        "facenet_vggface2": lambda: torch.save(facenet_state_dict(seed + 1, device), path("facenet_vggface2")),
        "face_parser_bisenet": lambda: torch.save(bisenet_state_dict(seed + 2, device), path("face_parser_bisenet")),
        "clip_vit_l14_openai": lambda: torch.save(open_clip_state_dict("ViT-L-14", seed + 3, device), path("clip_vit_l14_openai")),
        "deca_model": lambda: torch.save({"E_flame": deca_state_dict(seed + 4, device)}, path("deca_model")),
        "fan_2dfan4": lambda: write_fan(path("fan_2dfan4"), layout, seed + 6, device),
        "emoca_v2": lambda: write_emoca_release(path("emoca_v2"), random_emoca_state_dict(seed + 7)),
        "smirk": lambda: write_random_smirk_checkpoint(path("smirk"), seed + 8),
        "flame_model": lambda: write_synthetic_flame(out, seed=seed + 5, **(FLAME_SIZE if layout == "full" else {})),
    }
    written = {}
    for wid, write in writers.items():
        if only and wid not in only:
            continue
        start = time.perf_counter()
        write()
        ids = ("flame_model", "flame_texture", "flame_head_template") if wid == "flame_model" else (wid,)
        for i in ids:
            written[i] = path(i)
        print(f"{wid}: {path(wid)} ({_size(path(wid)) / 2**20:.0f} MiB, {time.perf_counter() - start:.1f} s)", flush=True)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layout", choices=("full", "tiny"), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="caphuman.ckpt's float dtype (the release is float32; float16 halves the file)")
    parser.add_argument("--only", nargs="*", help="manifest ids to write (default: all)")
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: faster)")
    args = parser.parse_args()
    write_all(args.out, args.layout, args.seed, getattr(torch, args.dtype), args.only, args.device)


if __name__ == "__main__":
    main()

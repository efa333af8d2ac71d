"""The `arc2face` and `arc2face_controlnet` methods: SD-1.5 fine-tuned on ArcFace embeddings (Arc2Face, MIT).

Identity: the reference's ArcFace embedding, through the project's one ArcFace path
(`faces/detection.py` MTCNN landmarks → `faces/arcface.py` alignment + onnxruntime), the largest face
when there are several (Arc2Face's README sorts insightface's faces by box area), made unit-length and
written into Arc2Face's text encoder (`models/arc2face.py`). Arc2Face's own code aligns on the five
landmarks of insightface's SCRFD detector (antelopev2 `scrfd_10g`); here MTCNN's five landmarks feed the
same `norm_crop` alignment, as for every ArcFace use in the project. The prompt is not used: Arc2Face is
conditioned on the identity alone ("photo of a id person"), so its cards list no `prompt` input.

Recogniser: Arc2Face was trained with the embeddings of its own `arcface.onnx` (an ArcFace R100 on
WebFace42M; its README replaces antelopev2's `glintr100.onnx` by it), so `arcface: arc2face` (the
default) reads that file; `arcface: antelopev2` uses `glintr100.onnx` (the `id_sim_arcface` metric's
network) instead. Both run through the same code and preprocessing, (x − 127.5) / 127.5 on the
112 × 112 crop. onnxruntime is checked before any work, with the command that installs it.

Head (`arc2face_controlnet`): Arc2Face's pose ControlNet (`gradio_demo/app_controlnet.py`) is fed
EMOCA's `normal_images` of the target head (foivospar/emoca `DecaModule.decode`, `SRenderY.forward`:
world-space FLAME vertex normals, interpolated over the faces, times the coverage mask), written
`((n · 0.5 + 0.5).clamp(0, 1) · 255).astype(uint8)` — RGB = (n + 1) / 2 with no axis flip, truncated,
so a frontal face is (127, 127, 255) and the background (n = 0) is (127, 127, 127). Our renderer's
normals are the same quantity (DECA/FLAME world space: x to the image's right, y up, z to the camera),
so `normals_to_arc2face_image` maps them with the identity axes. The code rendered is the
reference's DECA code with head pose, expression and jaw from the head condition
(`mixing: position,pose,expression`): the demo keeps the pose image's EMOCA code and swaps in only the
identity's shape (and detail) code. Where the head is drawn follows the demo's `run_emoca`: the pose photo
— here the reference (`head_frame: reference`), or the condition's `pose_image` — is FFHQ-aligned to the
output size (`faces/ffhq_align.py`, the demo's `image_align(ref_img, lmks, output_size=512)`) from its 68
landmarks (the demo: EMOCA's FAN, face_alignment 2DFAN; here `faces/landmarks.py`, FAN when `fan_2dfan4`
is present, else dlib's 68-point stand-in, same iBUG scheme), DECA's kpt68 crop of the aligned photo gives
the camera and the frame, and the head is rendered into that aligned frame. The identity's shape comes
from the reference as it is (the demo encodes the identity photo unaligned). One difference stays by
default: EMOCA's coarse code there, DECA's here (the same FLAME and renderer; EMOCA retrains the expression
branch); `reconstructor: emoca_v2` closes it where that reconstructor is installed. A reconstructor that
crops the face itself (SMIRK) reports no crop transform: no alignment, the head drawn in its crop frame.

Defaults (README "Usage" and the ControlNet demo): DPMSolverMultistepScheduler from SD-1.5's
scheduler config, 25 steps, guidance 3.0, no negative prompt, 512 × 512, ControlNet scale 1.0
(diffusers' default, the demo passes none).

With `tiny: true` (the smoke preset) the networks are tiny with random weights: SD-1.5's layout at
toy size, a 32-wide text encoder, a tiny ControlNet, and a tiny random ArcFace exported to ONNX in
the run's cache (needs the `onnx` package, part of the `test` extra), run through the same onnxruntime
path; the head is the synthetic FLAME-format head.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size
from caphuman_bench.methods.head_renders import HeadRenderMixin, chosen_reconstructor, head_weights
from caphuman_bench.models.reconstructors import reconstructor_class
from caphuman_bench.registry import register_method

ARCFACE_WEIGHTS = {"arc2face": "arc2face_arcface", "antelopev2": "arcface_antelopev2"}
MODEL_WEIGHTS = ("stable_diffusion_v1_5", "arc2face_unet", "arc2face_encoder")
# What each folder-shaped weights entry must hold for `from_pretrained` with local files only.
FOLDER_FILES = {
    "stable_diffusion_v1_5": ("model_index.json", "vae/config.json", "tokenizer/tokenizer_config.json",
                              "scheduler/scheduler_config.json"),
    "arc2face_unet": ("config.json",),
    "arc2face_encoder": ("config.json",),
    "arc2face_controlnet": ("config.json",),
}
TINY_WIDTH = 32
TINY_ARCFACE_DIM = 16


def require_onnxruntime() -> None:
    """Stop before any work when the ArcFace runtime is missing, naming what to install."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BenchError("arc2face needs ArcFace embeddings through onnxruntime, which is not installed: "
                         "pip install 'caphuman-bench[arcface]'") from None


def normals_to_arc2face_image(normal: np.ndarray) -> Image.Image:
    """Renderer normals [3, H, W] (x right, y up, z to the camera; 0 outside the head) → Arc2Face's
    ControlNet image: EMOCA's `(n * 0.5 + 0.5).clamp(0, 1) * 255` truncated to uint8, axes unchanged."""
    rgb = (np.clip(normal.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(rgb.transpose(1, 2, 0), mode="RGB")


def _folder(weights_id: str, path: Path) -> Path:
    """A folder entry resolves to the folder itself or to one file inside it (HF cache): the folder."""
    folder = path if path.is_dir() else path.parent
    missing = [f for f in FOLDER_FILES.get(weights_id, ()) if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder}: weights {weights_id!r} incomplete, missing {', '.join(missing)}")
    return folder


# ----------------------------------------------------------------------------------------------
# the tiny smoke model


def write_tiny_arcface_onnx(path: Path, seed: int = 0) -> Path:
    """A random 112 × 112 → TINY_ARCFACE_DIM network in ArcFace's ONNX interface (input NCHW float)."""
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except ImportError:
        raise BenchError("the arc2face smoke preset exports a tiny ArcFace to ONNX and needs the onnx package: "
                         "pip install 'caphuman-bench[test]'") from None
    from caphuman_bench.faces.arcface import ARCFACE_SIZE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(),
                                      torch.nn.Linear(4 * 14 * 14, TINY_ARCFACE_DIM)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(network, torch.zeros(1, 3, ARCFACE_SIZE, ARCFACE_SIZE), str(tmp), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}}, dynamo=False)
    tmp.replace(path)
    return path


def build_tiny_arc2face_pipeline(controlnet: bool, seed: int = 0):
    """Arc2Face's pipeline at toy size (64 px, 8×8 latents, width-32 text encoder), random weights."""
    from diffusers import (ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)

    from caphuman_bench.loaders.convert_caphuman import clip_tokenizer
    from caphuman_bench.loaders.convert_fastcomposer import SD15_PNDM
    from caphuman_bench.pipelines.tiny import redraw_like_reference, tiny_text_encoder, tiny_vae

    blocks = {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": TINY_WIDTH,
              "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **blocks)
        control = ControlNetModel(conditioning_embedding_out_channels=(16, 16, 32, 32), **blocks) if controlnet else None
        vae, text_encoder = tiny_vae(), tiny_text_encoder(TINY_WIDTH, 77)
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, control):
        if module is not None:  # diffusers zero-initialises ControlNet's zero convs: redraw so the head acts
            redraw_like_reference(module, generator)
    parts = dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(77), unet=unet.eval(),
                 scheduler=DPMSolverMultistepScheduler.from_config(SD15_PNDM), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    if controlnet:
        return StableDiffusionControlNetPipeline(controlnet=control.eval(), **parts)
    return StableDiffusionPipeline(**parts)


# ----------------------------------------------------------------------------------------------
# the adapters


@register_method("arc2face")
class Arc2FaceMethod(MethodAdapter):
    uses_controlnet = False
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "arcface": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        if str(params.get("arcface", "arc2face")) not in ARCFACE_WEIGHTS:
            raise BenchError(f"{where}: parameter 'arcface' must be one of {', '.join(ARCFACE_WEIGHTS)}, got {params['arcface']!r}")
        check_latent_size(params, where, square=cls.uses_controlnet)

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        require_onnxruntime()
        if params.get("tiny"):
            return []
        heads = ("arc2face_controlnet", *head_weights(params)) if cls.uses_controlnet else ()
        return [*MODEL_WEIGHTS, ARCFACE_WEIGHTS[str(params.get("arcface", "arc2face"))], *heads]

    def load(self) -> None:
        from caphuman_bench.faces.arcface import load_arcface

        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        self._embeddings: dict[str, torch.Tensor] = {}
        if self.params.get("tiny"):
            self.pipe = build_tiny_arc2face_pipeline(self.uses_controlnet, seed=0).to(dtype=self.dtype)
            folder = Path(self.context.workdir) if self.context.workdir else Path(tempfile.mkdtemp(prefix="arc2face-"))
            arcface_path = write_tiny_arcface_onnx(folder / "tiny_arcface.onnx")
        else:
            self.pipe = self._load_pipeline()
            arcface_path = self.context.weights[ARCFACE_WEIGHTS[str(self.params.get("arcface", "arc2face"))]]
        self.arcface = load_arcface(arcface_path, str(self.device))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)

    def _load_pipeline(self, controlnet=None):
        from diffusers import (DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                               UNet2DConditionModel)
        from transformers import CLIPTextModel

        paths = self.context.weights
        folders = {wid: _folder(wid, Path(paths[wid])) for wid in MODEL_WEIGHTS}
        unet = UNet2DConditionModel.from_pretrained(folders["arc2face_unet"], torch_dtype=self.dtype, local_files_only=True)
        # Arc2Face's `CLIPTextModelWrapper` is CLIPTextModel plus an embeddings input (see models/arc2face.py).
        text_encoder = CLIPTextModel.from_pretrained(folders["arc2face_encoder"], dtype=self.dtype, local_files_only=True)
        parts = dict(unet=unet, text_encoder=text_encoder, safety_checker=None, requires_safety_checker=False,
                     torch_dtype=self.dtype, local_files_only=True)
        if controlnet is not None:
            pipe = StableDiffusionControlNetPipeline.from_pretrained(folders["stable_diffusion_v1_5"], controlnet=controlnet, **parts)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folders["stable_diffusion_v1_5"], **parts)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return pipe

    def face_embedding(self, identity_id: str, reference: Image.Image) -> torch.Tensor:
        """The reference's raw ArcFace embedding [1, E] (largest MTCNN face), once per identity."""
        from caphuman_bench.faces.arcface import arcface_embeddings
        from caphuman_bench.faces.detection import detect_faces

        if identity_id not in self._embeddings:
            (found,) = detect_faces([reference], device=self.device)
            if found is None:
                raise BenchError(f"{self.card.name}: identity {identity_id!r}: MTCNN found no face in the reference photo; "
                                 "Arc2Face is conditioned on its ArcFace embedding")
            areas = (found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])
            (vector,) = arcface_embeddings(self.arcface, [reference], [found.all_landmarks[int(np.argmax(areas))]])
            self._embeddings[identity_id] = torch.from_numpy(vector).float()[None]
        return self._embeddings[identity_id]

    def pipeline_inputs(self, requests: list[GenerationRequest], size: tuple[int, int]) -> dict:
        """Extra pipeline arguments of a batch (the ControlNet variant adds its images)."""
        return {}

    def pipeline_call(self, requests: list[GenerationRequest]) -> dict:
        """The pipeline's arguments for a batch, as README "Usage" / the pose demo call it (the conformance
        check calls the pipeline with these too)."""
        from caphuman_bench.models.arc2face import arc2face_prompt_embeds

        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1:
            raise BenchError(f"{self.card.name}: a batch needs one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        faces = torch.cat([self.face_embedding(r.identity_id, r.reference) for r in requests])
        return dict(
            prompt_embeds=arc2face_prompt_embeds(self.pipe.text_encoder, self.pipe.tokenizer, faces),
            height=height,
            width=width,
            num_inference_steps=int(self.params.get("num_inference_steps", 25)),
            guidance_scale=float(self.params.get("guidance_scale", 3.0)),
            generator=[r.generator for r in requests],
            **self.pipeline_inputs(requests, (height, width)),
        )

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        return list(self.pipe(**self.pipeline_call(requests), output_type="pil").images)


@register_method("arc2face_controlnet")
class Arc2FaceControlNetMethod(HeadRenderMixin, Arc2FaceMethod):
    uses_controlnet = True
    param_types = {
        **Arc2FaceMethod.param_types,
        "controlnet_conditioning_scale": float,
        "mixing": str,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        from caphuman_bench.render.head_condition import parse_mode

        super().check_params(params, where)  # square: `uses_controlnet`
        try:
            parse_mode(str(params.get("mixing", "position,pose,expression")))
        except BenchError as exc:
            raise BenchError(f"{where}: parameter 'mixing': {exc}") from None

    def load(self) -> None:
        super().load()
        self.load_head_models(self.device, tiny=bool(self.params.get("tiny")))

    def _load_pipeline(self, controlnet=None):
        from diffusers import ControlNetModel

        folder = _folder("arc2face_controlnet", Path(self.context.weights["arc2face_controlnet"]))
        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=self.dtype, local_files_only=True)
        return super()._load_pipeline(controlnet)

    @classmethod
    def head_inputs(cls, params: dict) -> dict:
        recorded = super().head_inputs(params)
        if params.get("tiny") or reconstructor_class(chosen_reconstructor(params)).info.crop == "own":
            return recorded
        return {**recorded, "ffhq_align": "reference (and pose photo) FFHQ-aligned to height² from its 68 landmarks "
                "before the reconstructor, the head drawn in that frame (Arc2Face app_controlnet.py image_align)"}

    def frame_code(self, name: str, photo: Image.Image):
        """The pose demo's frame: `photo` FFHQ-aligned to the output size from its 68 landmarks, then DECA's code
        and crop of the aligned photo as it is (the demo's `preprocess_for_emoca` does not resample it).
        Not for tiny runs and reconstructors that crop the face themselves: they draw in the crop frame, no frame to align."""
        if self.params.get("tiny") or self.reconstructor.info.crop == "own":
            return self.photo_code(name, photo)
        key = f"ffhq-{name}"
        if key not in self._codes:
            from caphuman_bench.faces.ffhq_align import ffhq_align

            points = self._landmarks()(photo)
            if points is None:
                raise BenchError(f"{self.card.name}: {name!r}: no 68 face landmarks ({self._landmarks().source}) in the "
                                 "photo; Arc2Face's pose demo aligns it to FFHQ from them")
            self.photo_code(key, ffhq_align(photo, points, int(self.params.get("height", 512))), resize=False)
        return self._codes[key]

    def control_image(self, request: GenerationRequest) -> Image.Image:
        render = self.head_render(request.identity_id, request.reference, request.condition, request.height)
        return normals_to_arc2face_image(render.normal)

    def pipeline_inputs(self, requests: list[GenerationRequest], size: tuple[int, int]) -> dict:
        return {"image": [self.control_image(r) for r in requests],
                "controlnet_conditioning_scale": float(self.params.get("controlnet_conditioning_scale", 1.0))}

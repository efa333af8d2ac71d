"""The `instantid` method: SDXL + InstantID (InstantX, arXiv 2401.07519), steered to the target head.

Identity: the reference photo's raw ArcFace embedding (`reference_faces`: MTCNN + the project's
onnxruntime ArcFace on antelopev2's `glintr100.onnx`, the model the authors' `FaceAnalysis(name=
'antelopev2')` loads) through InstantID's IP-Adapter, and as IdentityNet's cross-attention context.

Head: where the authors draw the keypoints of the *reference* face (insightface's `face_info['kps']`),
this adapter draws the five keypoints of the **target head**: the reference's FLAME code (by `reconstructor`) mixed with
the head condition (`HeadRenderMixin`, as CapHuman and `ip_adapter_controlnet`), its 68 FLAME
landmarks projected with the render's orthographic camera (`render.landmarks`), reduced to
InsightFace's five (eye centres, nose tip, mouth corners), drawn by InstantID's `draw_kps` convention
(`pipelines.pipeline_instantid.draw_keypoints`). So IdentityNet is steered to the same head pose and
framing as CapHuman, and head-control scoring compares against that same target.

Weights: SDXL base 1.0 (`infer.py`'s base model), `ControlNetModel/` and `ip-adapter.bin` of
InstantX/InstantID (torch pickle of tensors, read with weights_only=True), `glintr100.onnx`, and the
FLAME files and the reconstructor's (DECA's by default) of the head target.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.methods.base import GenerationRequest, MethodAdapter, check_latent_size, consecutive_batches
from caphuman_bench.methods.head_renders import HeadRenderMixin, head_weights
from caphuman_bench.methods.photomaker import SDXL_FOLDER, sdxl_folder
from caphuman_bench.methods.reference_faces import ReferenceFaces, require_onnxruntime
from caphuman_bench.registry import register_method

MODEL_WEIGHTS = (SDXL_FOLDER, "instantid_controlnet", "instantid_ip_adapter", "arcface_antelopev2")

log = logging.getLogger(__name__)


def build_tiny_instantid_pipeline(seed: int = 0):
    """SDXL's layout at toy size with a tiny IdentityNet and IP-Adapter (512-d face embedding → 16 tokens)."""
    from caphuman_bench.methods.ip_adapter_controlnet import tiny_ip_adapter_plus_state_dict
    from caphuman_bench.pipelines.pipeline_instantid import StableDiffusionXLInstantIDPipeline
    from caphuman_bench.pipelines.tiny_sdxl import tiny_sdxl_components

    pipe = StableDiffusionXLInstantIDPipeline(**tiny_sdxl_components(seed, controlnet=True), add_watermarker=False)
    generator = torch.Generator().manual_seed(seed + 1)
    state_dict = tiny_ip_adapter_plus_state_dict(pipe.unet, 512, generator)
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None, low_cpu_mem_usage=False)
    return pipe


@register_method("instantid")
class InstantIDMethod(HeadRenderMixin, MethodAdapter):
    param_types = {
        **MethodAdapter.param_types,
        "num_inference_steps": int,
        "guidance_scale": float,
        "ip_adapter_scale": float,
        "controlnet_conditioning_scale": float,
        "negative_prompt": str,
        "mixing": str,
        "dtype": str,
        "tiny": bool,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        super().check_params(params, where)
        check_latent_size(params, where, square=True, latents="SDXL", default=1024)

    @classmethod
    def required_weights(cls, card, params: dict[str, Any]) -> list[str]:
        if params.get("tiny"):
            return []
        require_onnxruntime(card.name)
        return [*MODEL_WEIGHTS, *head_weights(params), "flame_landmark_embedding"]

    def load(self) -> None:
        from caphuman_bench.render.landmarks import HeadLandmarks

        self.device = torch.device(self.context.device)
        self.dtype = self.compute_dtype(self.device)
        self._codes: dict[str, dict[str, np.ndarray]] = {}
        if self.params.get("tiny"):
            self.pipe = build_tiny_instantid_pipeline()
            if self.dtype != torch.float32:
                self.pipe.to(dtype=self.dtype)
            self.load_head_models(self.device, tiny=True)
            self.landmarks = HeadLandmarks.synthetic(self.renderer)
            self.faces = ReferenceFaces("instantid")
        else:
            self._load_full()
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe = self.accelerate(self.pipe)  # the CUDA fast path (pipelines/acceleration.py)
        self._note_negative_prompt_cut()

    def _note_negative_prompt_cut(self) -> None:
        """infer.py's negative prompt (92 tokens) is longer than CLIP reads (75): the authors' pipeline cuts
        it in diffusers' `encode_prompt` (truncation=True), and so does this one; said once, in the run's log."""
        from caphuman_bench.pipelines.pipeline_instantid import clip_token_count

        count, read = clip_token_count(self.pipe.tokenizer, str(self.params.get("negative_prompt", "")))
        if read < count:
            log.info("instantid: the negative prompt has %d tokens; both text encoders read the first %d, as in the "
                     "authors' pipeline (diffusers' encode_prompt, truncation=True)", count, read)

    def _load_full(self) -> None:
        from caphuman_bench.faces.arcface import load_arcface
        from caphuman_bench.render.landmarks import HeadLandmarks, LandmarkEmbedding

        paths = self.context.weights
        self.pipe = self._load_pipeline(paths)
        self.load_head_models(self.device, tiny=False)
        self.landmarks = HeadLandmarks(self.renderer, LandmarkEmbedding.from_file(paths["flame_landmark_embedding"]))
        self.faces = ReferenceFaces("instantid", load_arcface(paths["arcface_antelopev2"], str(self.device)))

    def _load_pipeline(self, paths: dict[str, Path]):
        """SDXL + IdentityNet + InstantID's IP-Adapter from the resolved files."""
        from caphuman_bench.pipelines.pipeline_instantid import load_instantid_pipeline
        from caphuman_bench.weights import load_torch_file

        controlnet_dir = Path(paths["instantid_controlnet"])
        controlnet_dir = controlnet_dir if controlnet_dir.is_dir() else controlnet_dir.parent
        if not (controlnet_dir / "config.json").exists():
            raise BenchError(f"{controlnet_dir}: weights 'instantid_controlnet' incomplete, missing config.json")
        adapter_path = Path(paths["instantid_ip_adapter"])
        state_dict = load_torch_file(adapter_path, "InstantID's ip-adapter.bin")
        if not isinstance(state_dict, dict) or not {"image_proj", "ip_adapter"} <= set(state_dict):
            raise BenchError(f"{adapter_path}: not InstantID's ip-adapter.bin (expected keys image_proj and ip_adapter)")
        return load_instantid_pipeline(sdxl_folder(Path(paths[SDXL_FOLDER])), controlnet_dir, state_dict, self.dtype)

    def target_keypoints(self, request: GenerationRequest) -> np.ndarray:
        """InsightFace's five keypoints [5, 2] of the target head, in pixels of the generated image."""
        from caphuman_bench.render.landmarks import five_keypoints

        return five_keypoints(self.head_landmarks(request.identity_id, request.reference, request.condition, request.height))

    def control_image(self, request: GenerationRequest) -> Image.Image:
        from caphuman_bench.pipelines.pipeline_instantid import draw_keypoints

        return draw_keypoints(self.target_keypoints(request), request.width, request.height)

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Batches of consecutive requests of one identity (one face embedding per pipeline call)."""
        batch_size = int(self.params.get("batch_size", 1))
        return [image for batch in consecutive_batches(requests, batch_size) for image in self._generate_batch(batch)]

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        sizes = {(r.height, r.width) for r in requests}
        if len(sizes) != 1 or any(h != w for h, w in sizes):
            raise BenchError(f"instantid: a batch needs one square size, got {sorted(sizes)}")
        size = sizes.pop()[0]
        first = requests[0]
        return list(self.pipe(
            [r.prompt for r in requests],
            image=[self.control_image(r) for r in requests],
            face_embedding=self.faces.embedding(first.identity_id, first.reference),
            negative_prompt=[str(self.params.get("negative_prompt", ""))] * len(requests),
            height=size,
            width=size,
            num_inference_steps=int(self.params.get("num_inference_steps", 30)),
            guidance_scale=float(self.params.get("guidance_scale", 5.0)),
            controlnet_conditioning_scale=float(self.params.get("controlnet_conditioning_scale", 0.8)),
            ip_adapter_scale=float(self.params.get("ip_adapter_scale", 0.8)),
            generator=[r.generator for r in requests],
        ))

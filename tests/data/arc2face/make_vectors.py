"""Make the Arc2Face known-answer vectors by running the authors' code (foivospar/Arc2Face) on tiny random weights.

    python make_vectors.py --authors-repo /path/to/Arc2Face [--out DIR]

Run it in an environment with the authors' pins (diffusers 0.29.2, transformers 4.36.0; see README.md), CPU,
float32. It writes, beside itself unless --out says otherwise:

- the tiny models in the released layouts: `models/arc2face/` (UNet), `models/encoder/` (the authors'
  `CLIPTextModelWrapper`, hidden size 512 as `project_face_embs` requires), `models/controlnet/`, and an
  SD-1.5-shaped `sd15/` (model_index.json, tiny VAE, a tiny CLIP BPE tokenizer, SD-1.5's scheduler config);
  weights are drawn at random, rounded to float16 and stored as float16 (loaded as float32);
- `cases.safetensors` + `cases.json`: per card the inputs, the id-conditioned prompt embeddings, the
  ControlNet input tensor and residuals, and 3 DPM-Solver steps with guidance 3.0 (UNet inputs and
  outputs, latents), made as README "Usage" (arc2face) and gradio_demo/app_controlnet.py
  (arc2face_controlnet) make them, with the initial latents passed instead of a generator;
- the FFHQ alignment (`arc2face.utils.image_align`) of a synthetic photo for given 68 landmarks, two cases.

Nothing here reads a file it did not write; every input is drawn from fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ID_WORDS = ("photo", "of", "a", "id", "person")
LATENT = 8  # 64 px images
SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
             "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
STEPS, GUIDANCE, IMAGES_PER_PROMPT = 3, 3.0, 2


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer whose vocabulary holds just the words of "photo of a id person" (and their pieces)."""
    vocab, merges = [], []
    for word in ID_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        vocab += [p for p in pieces if p not in vocab]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))


@torch.no_grad()
def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter drawn anew (diffusers zero-initialises zero convs and output layers), then rounded to
    float16 so that the float16 files hold exactly the float32 weights used: weights N(0, 1/fan_in) (gain 1.7
    in ControlNet's conditioning embedding), biases and norm shifts N(0, 0.1²), norm scales 1 + N(0, 0.1²)."""
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1 and "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif param.ndim == 1:
            value = 0.1 * noise
        else:
            gain = 1.7 if "controlnet_cond_embedding" in name else 1.0
            value = noise * gain / float(np.sqrt(np.prod(param.shape[1:])))
        param.copy_(value.half().float())


def tiny_models(vocab_size: int):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from arc2face import CLIPTextModelWrapper

    blocks = {"block_out_channels": (16, 32), "layers_per_block": 1, "cross_attention_dim": 512, "norm_num_groups": 8,
              "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}
    unet = UNet2DConditionModel(sample_size=LATENT, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **blocks)
    controlnet = ControlNetModel(conditioning_embedding_out_channels=(8, 8, 16, 16), **blocks)
    encoder = CLIPTextModelWrapper(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=64)
    generator = torch.Generator().manual_seed(0)
    for module in (unet, controlnet, encoder, vae):
        redraw(module, generator)
    return unet.eval(), controlnet.eval(), encoder.eval(), vae.eval()


def write_models(out: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler  # noqa: F401  (the environment check)

    write_tokenizer(out / "sd15" / "tokenizer")
    vocab_size = len(json.loads((out / "sd15" / "tokenizer" / "vocab.json").read_text()))
    unet, controlnet, encoder, vae = tiny_models(vocab_size)
    unet.half().save_pretrained(out / "models" / "arc2face")
    controlnet.half().save_pretrained(out / "models" / "controlnet")
    encoder.half().save_pretrained(out / "models" / "encoder")
    vae.half().save_pretrained(out / "sd15" / "vae")
    (out / "sd15" / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "sd15" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    (out / "sd15" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=1))


def load_pipeline(out: Path, controlnet: bool):
    """As README "Usage" / app_controlnet.py load it (local folders, float32)."""
    from diffusers import (ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)

    from arc2face import CLIPTextModelWrapper

    dtype = torch.float32
    encoder = CLIPTextModelWrapper.from_pretrained(out / "models", subfolder="encoder", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(out / "models", subfolder="arc2face", torch_dtype=dtype)
    if controlnet:
        control = ControlNetModel.from_pretrained(out / "models", subfolder="controlnet", torch_dtype=dtype)
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            out / "sd15", text_encoder=encoder, unet=unet, controlnet=control, torch_dtype=dtype, safety_checker=None)
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(out / "sd15", text_encoder=encoder, unet=unet,
                                                           torch_dtype=dtype, safety_checker=None)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sphere_normals(size: int) -> np.ndarray:
    """Normals [3, size, size] of a sphere lit from the camera, turned a little (x right, y up, z to the camera); 0 outside."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (xs - size * 0.45) / (size * 0.35), -(ys - size * 0.5) / (size * 0.4)
    inside = u ** 2 + v ** 2 < 1.0
    normals = np.stack([u, v, np.sqrt(np.clip(1.0 - u ** 2 - v ** 2, 0.0, None))]) * inside
    return normals.astype(np.float32)


def run_card(out: Path, controlnet: bool, tensors: dict, prefix: str) -> dict:
    from arc2face import project_face_embs

    pipeline = load_pipeline(out, controlnet)
    rng = torch.Generator().manual_seed(1 + controlnet)
    id_embeddings = torch.randn(1 if controlnet else 2, 512, generator=rng) * 7.0  # raw ArcFace embeddings (not unit length)
    latents = torch.randn(IMAGES_PER_PROMPT, 4, LATENT, LATENT, generator=rng)
    tensors[f"{prefix}/id_embeddings"], tensors[f"{prefix}/x_T"] = id_embeddings, latents
    # README: id_emb / ||id_emb||, then project_face_embs (one identity per call, as the demo; its mask
    # indexing takes one identity at a time)
    unit = id_embeddings / torch.norm(id_embeddings, dim=1, keepdim=True)
    prompt_embeds = torch.cat([project_face_embs(pipeline, unit[i : i + 1]) for i in range(len(unit))])
    tensors[f"{prefix}/prompt_embeds"] = prompt_embeds

    record: dict[str, list] = {"unet_sample": [], "unet_timestep": [], "unet_out": [], "latents": []}

    def unet_hook(module, args, kwargs, output):
        record["unet_sample"].append(args[0].clone())
        record["unet_timestep"].append(torch.as_tensor(args[1]).reshape(-1)[:1].clone())
        record.setdefault("unet_context", kwargs["encoder_hidden_states"].clone())
        record["unet_out"].append(output[0].clone())

    def controlnet_hook(module, args, kwargs, output):
        record.setdefault("controlnet_cond", kwargs["controlnet_cond"].clone())
        record.setdefault("controlnet_down", [t.clone() for t in output[0]])
        record.setdefault("controlnet_mid", output[1].clone())

    def on_step_end(pipe, step, timestep, step_tensors):
        record["latents"].append(step_tensors["latents"].clone())
        return step_tensors

    hooks = [pipeline.unet.register_forward_hook(unet_hook, with_kwargs=True)]
    extra = {}
    if controlnet:
        normals = sphere_normals(LATENT * 8)
        tensors[f"{prefix}/normals"] = torch.from_numpy(normals)
        # app_controlnet.py run_emoca: cond_img = ((normal_images*0.5+0.5).clamp(0,1).permute(1,2,0)*255).astype(uint8)
        image = ((torch.from_numpy(normals) * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tensors[f"{prefix}/control_image"] = torch.from_numpy(image)
        extra["image"] = Image.fromarray(image)
        hooks.append(pipeline.controlnet.register_forward_hook(controlnet_hook, with_kwargs=True))
    with torch.no_grad():
        result = pipeline(prompt_embeds=prompt_embeds[:1], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          num_images_per_prompt=IMAGES_PER_PROMPT, latents=latents, output_type="np",
                          callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"], **extra)
    for hook in hooks:
        hook.remove()
    # the unconditional half of the UNet's context: diffusers' encoding of the empty negative prompt
    tensors[f"{prefix}/negative_prompt_embeds"] = record["unet_context"][:1]
    for name in ("unet_sample", "unet_timestep", "unet_out", "latents"):
        tensors[f"{prefix}/{name}"] = torch.stack(record[name])
    tensors[f"{prefix}/image"] = torch.from_numpy(np.ascontiguousarray(result.images))
    case = {"card": prefix, "steps": STEPS, "guidance_scale": GUIDANCE, "images_per_prompt": IMAGES_PER_PROMPT,
            "identity": 0, "timesteps": pipeline.scheduler.timesteps.tolist(), "height": LATENT * 8, "width": LATENT * 8}
    if controlnet:
        tensors[f"{prefix}/controlnet_cond"] = record["controlnet_cond"]
        tensors[f"{prefix}/controlnet_mid"] = record["controlnet_mid"]
        for k, residual in enumerate(record["controlnet_down"]):
            tensors[f"{prefix}/controlnet_down_{k:02d}"] = residual
        case["controlnet_down"] = len(record["controlnet_down"])
        case["controlnet_conditioning_scale"] = 1.0
    return case


def ffhq_landmarks(centre, eye_distance, angle_deg, rng) -> np.ndarray:
    """68 iBUG points of a synthetic face: eyes (36–47) and mouth (48–59) where a face has them, the rest jittered."""
    points = rng.normal(0.0, 0.4, size=(68, 2))
    for start, x in ((36, -0.5), (42, 0.5)):  # eye rings around (±0.5, 0)
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        points[start : start + 6] = np.stack([x + 0.15 * np.cos(t), 0.06 * np.sin(t)], axis=1)
    t = np.linspace(np.pi, 3 * np.pi, 12, endpoint=False)  # outer lip from the left corner (48) round to 59
    points[48:60] = np.stack([0.4 * np.cos(t), 1.1 + 0.15 * np.sin(t)], axis=1)
    points[48:60] += rng.normal(0.0, 0.01, size=(12, 2))
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rotation.T * eye_distance + np.asarray(centre, dtype=np.float64)


def run_align(tensors: dict) -> list[dict]:
    """image_align on a smooth random photo: CelebA-sized with the face filling it (reflect padding and blur), and a
    large photo for a small output (the shrink step)."""
    from arc2face import image_align

    rng = np.random.RandomState(5)
    cases = []
    for name, (width, height), centre, eye_distance, angle, output_size in (
        ("celeba_pad", (178, 218), (90.0, 105.0), 40.0, 8.0, 128),
        ("large_shrink", (260, 240), (130.0, 110.0), 60.0, -15.0, 48),
    ):
        coarse = rng.uniform(0, 255, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
        photo = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.randint(-12, 13, size=(height, width, 3))
        photo = Image.fromarray(np.clip(np.asarray(photo).astype(int) + noise, 0, 255).astype(np.uint8))
        landmarks = ffhq_landmarks(centre, eye_distance, angle, rng)
        aligned = image_align(photo.copy(), landmarks, output_size=output_size)
        tensors[f"align/{name}/photo"] = torch.from_numpy(np.asarray(photo).copy())
        tensors[f"align/{name}/landmarks"] = torch.from_numpy(landmarks)
        tensors[f"align/{name}/aligned"] = torch.from_numpy(np.asarray(aligned).copy())
        cases.append({"name": name, "output_size": output_size})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", required=True, type=Path, help="a checkout of foivospar/Arc2Face")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.authors_repo.resolve()))
    torch.set_num_threads(2)
    import diffusers
    import transformers

    write_models(args.out)
    tensors: dict[str, torch.Tensor] = {}
    cases = {"arc2face": run_card(args.out, False, tensors, "arc2face"),
             "arc2face_controlnet": run_card(args.out, True, tensors, "arc2face_controlnet"),
             "align": run_align(tensors)}
    cases["environment"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "numpy": np.__version__,
                            "pillow": Image.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "cases.safetensors"))
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()

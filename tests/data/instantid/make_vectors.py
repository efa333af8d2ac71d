"""Make InstantID's known-answer vectors by running the authors' code on tiny random weights.

Run in an environment with the authors' pins (see README.md), not the project's:

    python tests/data/instantid/make_vectors.py --authors-repo /path/to/InstantID

It imports `pipeline_stable_diffusion_xl_instantid` (and through it `ip_adapter/`) from the authors'
checkout, builds a tiny SDXL + IdentityNet + IP-Adapter in code, writes them in the official layouts
(an SDXL diffusers folder `sdxl/`, IdentityNet's `ControlNetModel/`, `ip-adapter.bin`'s two dicts as
`ip-adapter.safetensors` with keys `image_proj.*` and `ip_adapter.*`), loads them back the way the
authors' `infer.py` does, and records what the authors' pipeline computes (`cases.safetensors`,
`cases.json`) plus `draw_kps` drawings (`draw_kps_*.png`). Nothing here is imported by the project.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
TEXT_DIM = 16  # each of the two tiny CLIP text encoders; the UNet cross-attends to 2 × 16
TIME_EMBED_DIM = 8
# the authors' set_image_proj_model hard-codes Resampler(dim=1280, heads=20, dim_head=64, depth=4, ...);
# only width and heads shrink here (dim_head stays 64: diffusers infers heads = rows of to_q / 64).
TINY_RESAMPLER = {"dim": 128, "heads": 2}
EULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
         "interpolation_type": "linear", "use_karras_sigmas": False}  # SDXL base's scheduler_config.json
# infer.py's n_prompt (and the card's negative prompt)
NEGATIVE_PROMPT = ("(lowres, low quality, worst quality:1.2), (text:1.2), watermark, painting, drawing, illustration, "
                   "glitch, deformed, mutated, cross-eyed, ugly, disfigured (lowres, low quality, worst quality:1.2), "
                   "(text:1.2), watermark, painting, drawing, illustration, glitch,deformed, mutated, cross-eyed, ugly, "
                   "disfigured")
PROMPTS = ("a photo of a woman", "analog film photo of a man, grainy")
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 5.0, "controlnet_conditioning_scale": 0.8,
            "ip_adapter_scale": 0.8}  # infer.py's, but 3 steps instead of 30
SIZE = 64  # pixels; 8 × 8 latents
KEYPOINTS = [[21.0, 25.0], [43.5, 24.0], [32.0, 35.5], [24.0, 47.0], [41.0, 46.5]]  # 5 × (x, y) in a 64 px image
# draw_kps at the sizes infer.py's resize_img gives (short side 1024): square and landscape
DRAW_KPS = {"draw_kps_1024x1024": ((1024, 1024), [[300.4, 400.2], [700.9, 410.6], [505.5, 560.1], [350.2, 750.8],
                                                  [650.7, 745.3]]),
            "draw_kps_1280x1024": ((1280, 1024), [[520.0, 380.5], [790.3, 370.2], [660.8, 520.9], [560.1, 700.4],
                                                  [770.6, 690.2]])}


def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (diffusers zero-initialises zero convs and output convs), rounded to a value
    float16 holds exactly so the stored float16 files give back the very weights used here.
    Weights ~ N(0, gain² / fan_in) (gain 1.7 in ControlNet's hint encoder), biases and norm shifts ~ N(0, 0.1²),
    norm scales ~ 1 + N(0, 0.1²)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif param.ndim == 1:
                value = 0.1 * noise
            else:
                gain = 1.7 if "controlnet_cond_embedding" in name else 1.0
                value = noise * gain / math.sqrt(math.prod(param.shape[1:]))
            param.copy_(value.half().float())


def tiny_tokenizer(folder: Path, pad_token: str):
    """A CLIP BPE tokenizer with no merges (every character a token): 514 entries instead of 49408,
    so the text encoders stay small. Same vocabulary order as CLIP's (bytes, bytes + '</w>', specials)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(folder / "vocab.json", folder / "merges.txt", pad_token=pad_token, model_max_length=77)


def build_models(generator: torch.Generator, work: Path) -> dict:
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(work / "tok", "<|endoftext|>")  # SDXL's tokenizer pads with <|endoftext|>,
    tokenizer_2 = tiny_tokenizer(work / "tok2", "!")  # tokenizer_2 with "!"
    text = {"vocab_size": len(tokenizer), "hidden_size": TEXT_DIM, "intermediate_size": 2 * TEXT_DIM,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_act="gelu", projection_dim=TEXT_DIM))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM, cross_attention_dim=2 * TEXT_DIM)
    # IdentityNet: a ControlNet of the UNet's layout (the official config.json has SDXL's sizes);
    # three stride-2 convs in the hint encoder take 64 px to 8 px as 1024 to 128.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=SIZE, scaling_factor=0.13025)
    for module in (text_encoder, text_encoder_2, unet, controlnet, vae):
        redraw(module, generator)
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2, "unet": unet, "scheduler": EulerDiscreteScheduler(**EULER),
            "controlnet": controlnet}


def ip_adapter_state_dict(unet, generator: torch.Generator) -> dict:
    """ip-adapter.bin's layout: {"image_proj": the Resampler's state dict, "ip_adapter": to_k_ip / to_v_ip of
    every processor in `unet.attn_processors` order, keyed by that position (attn2's: 1, 3, 5, ...)}."""
    from ip_adapter.resampler import Resampler

    resampler = Resampler(**{"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "num_queries": 16,
                             "embedding_dim": 512, "output_dim": unet.config.cross_attention_dim, "ff_mult": 4,
                             **TINY_RESAMPLER})
    redraw(resampler, generator)
    layers = {}
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn1.processor"):
            to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
            for key in ("to_k_ip", "to_v_ip"):
                weight = torch.randn(to_k.shape, generator=generator) / math.sqrt(to_k.shape[1])
                layers[f"{index}.{key}.weight"] = weight.half().float()
    return {"image_proj": resampler.state_dict(), "ip_adapter": layers}


class Recorder:
    """What the pipeline hands to IdentityNet, the UNet and the scheduler, step by step (forward hooks)."""

    def __init__(self, pipe):
        self.controlnet, self.unet, self.steps = [], [], []
        pipe.controlnet.register_forward_pre_hook(lambda m, a, kw: self.controlnet.append(dict(kw)), with_kwargs=True)
        pipe.controlnet.register_forward_hook(lambda m, a, kw, out: self.controlnet[-1].update(out=out), with_kwargs=True)
        pipe.unet.register_forward_pre_hook(lambda m, a, kw: self.unet.append(dict(kw)), with_kwargs=True)
        step = pipe.scheduler.step

        def recording_step(model_output, timestep, sample, *args, **kwargs):
            result = step(model_output, timestep, sample, *args, **kwargs)
            self.steps.append({"noise_pred": model_output, "t": timestep, "sample": sample, "prev": result[0]})
            return result

        pipe.scheduler.step = recording_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", required=True, type=Path, help="checkout of InstantX/InstantID")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    sys.path.insert(0, str(args.authors_repo.resolve()))
    import pipeline_stable_diffusion_xl_instantid as official
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    official_resampler = official.Resampler
    official.Resampler = lambda **kwargs: official_resampler(**{**kwargs, **TINY_RESAMPLER})
    generator = torch.Generator().manual_seed(20240115)
    out = args.out
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(generator, Path(tmp))
        controlnet = models.pop("controlnet")
        sdxl = StableDiffusionXLPipeline(**models, add_watermarker=False)
        sdxl.to(torch.float16).save_pretrained(out / "sdxl", safe_serialization=True)
        controlnet.to(torch.float16).save_pretrained(out / "ControlNetModel", safe_serialization=True)
        adapter = ip_adapter_state_dict(models["unet"], generator)
        save_file({f"{part}.{k}": v.half().contiguous() for part, sd in adapter.items() for k, v in sd.items()},
                  out / "ip-adapter.safetensors")
        torch.save(adapter, Path(tmp) / "ip-adapter.bin")

        # infer.py's loading, in float32 on the CPU
        controlnet = ControlNetModel.from_pretrained(out / "ControlNetModel", torch_dtype=torch.float32)
        pipe = official.StableDiffusionXLInstantIDPipeline.from_pretrained(
            out / "sdxl", controlnet=controlnet, torch_dtype=torch.float32, add_watermarker=False)
        pipe.load_ip_adapter_instantid(str(Path(tmp) / "ip-adapter.bin"))
    pipe.set_progress_bar_config(disable=True)

    face_embedding = torch.randn(512, generator=generator) * (22.0 / math.sqrt(512))  # raw ArcFace norms are ~20-30
    kps_image = official.draw_kps(Image.new("RGB", (SIZE, SIZE)), np.array(KEYPOINTS))
    tensors = {"inputs/face_embedding": face_embedding, "inputs/keypoints": torch.tensor(KEYPOINTS),
               "inputs/keypoint_image": torch.from_numpy(np.asarray(kps_image).copy())}
    cases = []
    # one case per prompt (the authors' pipeline takes one prompt per call: its image tokens have batch 1),
    # then the port's batch of both prompts is checked against the two calls.
    for index, (prompt, seed) in enumerate(zip(PROMPTS, (0, 1))):
        name = f"prompt{index}_seed{seed}"
        recorder = Recorder(pipe)
        pipe(prompt=prompt, negative_prompt=NEGATIVE_PROMPT, image_embeds=face_embedding.numpy(), image=kps_image,
             generator=torch.Generator().manual_seed(seed), output_type="latent", **SETTINGS)
        first_control, first_unet = recorder.controlnet[0], recorder.unet[0]
        text_and_image = first_unet["encoder_hidden_states"]  # [uncond; cond] × (77 text + 16 image tokens)
        record = {
            "prompt_embeds": text_and_image[:, :77],
            "image_tokens": text_and_image[:, 77:],
            "controlnet_context": first_control["encoder_hidden_states"],
            "pooled_prompt_embeds": first_unet["added_cond_kwargs"]["text_embeds"],
            "add_time_ids": first_unet["added_cond_kwargs"]["time_ids"],
            "control_image": first_control["controlnet_cond"],
            "timesteps": torch.stack([torch.as_tensor(s["t"]) for s in recorder.steps]),
            "latents": torch.stack([recorder.steps[0]["sample"]] + [s["prev"] for s in recorder.steps]),
            "noise_pred": torch.stack([s["noise_pred"] for s in recorder.steps]),
        }
        down, mid = first_control["out"]
        record.update({f"controlnet_down_{k:02d}": r for k, r in enumerate(down)}, controlnet_mid=mid)
        tensors.update({f"{name}/{k}": v.detach().contiguous() for k, v in record.items()})
        cases.append({"name": name, "prompt": prompt, "negative_prompt": NEGATIVE_PROMPT, "seed": seed,
                      "outputs": {k: f"{name}/{k}" for k in record}, "controlnet_residuals": len(down) + 1})
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, out / "cases.safetensors")
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    meta = {"variant": "tiny_sdxl_instantid", "size": SIZE, "settings": SETTINGS, "cases": cases,
            "batch_case": {"name": "both_prompts_batched", "of": [c["name"] for c in cases]},
            "tiny_resampler": TINY_RESAMPLER, "shapes": shapes,
            "draw_kps": {name: {"width": w, "height": h, "keypoints": kps} for name, ((w, h), kps) in DRAW_KPS.items()}}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name, ((w, h), kps) in DRAW_KPS.items():
        official.draw_kps(Image.new("RGB", (w, h)), np.array(kps)).save(out / f"{name}.png")


if __name__ == "__main__":
    main()

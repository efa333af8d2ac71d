"""Make the FastComposer known-answer vectors by running the authors' own code on tiny random weights.

Run in an environment the authors' code imports in (README.md here: diffusers 0.16.1, transformers 4.29.2):

    python make_vectors.py --authors-repo /path/to/mit-han-lab/fastcomposer [--out DIR]

What runs is the authors' inference path (demo/pipeline.py `convert_model_to_pipeline`, then
`StableDiffusionFastCompposerPipeline.__call__`, as evaluation/single_object/run.py calls it), with only
the hub downloads replaced: `FastComposerModel.from_pretrained` returns a tiny `FastComposerModel` built
by the authors' own constructors, `CLIPTokenizer.from_pretrained` returns CLIP's BPE tokenizer (open_clip's
bundled vocabulary), `StableDiffusionFastCompposerPipeline.from_pretrained` builds the pipeline from tiny
components, and the fine-tuned checkpoint the demo `torch.load`s is this tiny model's `state_dict()`,
which is also stored here (`state_dict.safetensors`, the official checkpoint's key names, the text token
table cut to the rows the cases use: `cut_token_table`). Hooks record
what the call computes on the way: token ids, the image-token mask, the subject pixels, the object
embeddings, the text embeddings before and after the postfuse MLP, and every scheduler step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HPARAMS = {
    "variant": "fastcomposer_tiny_a",
    "unet": {"sample_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "cross_attention_dim": 8, "attention_head_dim": 2,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "vae": {"block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "sample_size": 64},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    "image_encoder": {"hidden_size": 16, "intermediate_size": 32, "projection_dim": 8, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"},
}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (the pipeline the authors load)
SD15_PNDM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}
CASES = [
    # the humaniphc prompt acc-red-hat as the fastcomposer method writes it; a tall reference (padded at the sides)
    {"name": "red_hat_alpha05", "prompt": "a photo of a woman img wearing a red hat", "reference_hw": [56, 40],
     "seed": 11, "alpha": 0.5},
    # sty-cyberpunk: the trigger right before a comma ("img,"); a wide reference (padded top and bottom)
    {"name": "cyberpunk_img_comma_alpha07", "prompt": "a cyberpunk portrait of a man img, neon lights",
     "reference_hw": [36, 52], "seed": 12, "alpha": 0.7},
]
CALL = {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 5.0, "object_resolution": 48}
TOKEN_TABLE = "text_encoder.embeddings.token_embedding"


@torch.no_grad()
def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter redrawn (the constructors zero several output layers): weights ~ N(0, 1/fan_in),
    biases and norm shifts ~ N(0, 0.1²), norm scales ~ 1 + N(0, 0.1²)."""
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        if param.ndim == 1 and "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of openai/clip-vit-large-patch14 from open_clip's bundled BPE file."""
    import open_clip.tokenizer as oct

    text = gzip.open(oct.default_bpe()).read().decode("utf-8")
    merges = text.split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_model(args):
    """A FastComposerModel as `FastComposerModel.from_pretrained` builds it, at toy size, random weights."""
    import torchvision.transforms as T
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from fastcomposer.model import FastComposerCLIPImageEncoder, FastComposerModel, FastComposerTextEncoder

    torch.manual_seed(0)
    text_encoder = FastComposerTextEncoder(CLIPTextModel(CLIPTextConfig(**HPARAMS["text_encoder"])).text_model)
    clip = CLIPModel(CLIPConfig(text_config=HPARAMS["text_encoder"], vision_config=HPARAMS["image_encoder"],
                                projection_dim=HPARAMS["image_encoder"]["projection_dim"]))
    image_encoder = FastComposerCLIPImageEncoder(  # as its from_pretrained: CLIP's vision tower + projection
        clip.vision_model, clip.visual_projection,
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))
    unet = UNet2DConditionModel(**HPARAMS["unet"])
    vae = AutoencoderKL(**HPARAMS["vae"])
    model = FastComposerModel(text_encoder, image_encoder, vae, unet, args)
    redraw(model, torch.Generator().manual_seed(2024))
    return model.eval()


def authors_pipeline(authors_repo: Path, workdir: Path):
    """demo/pipeline.py `convert_model_to_pipeline`, the authors' code, with the hub loads answered locally."""
    sys.path.insert(0, str(authors_repo))
    import demo.pipeline as demo
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel, CLIPTextConfig, CLIPTokenizer
    from fastcomposer.model import FastComposerModel
    from fastcomposer.pipeline import StableDiffusionFastCompposerPipeline

    args = SimpleNamespace(
        pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5", revision=None, non_ema_revision=None,
        mixed_precision="no", finetuned_model_path=str(workdir / "pytorch_model.bin"),
        object_resolution=CALL["object_resolution"], object_localization=False, object_localization_weight=0.0,
        localization_layers=5, mask_loss=False, mask_loss_prob=0.0)
    model = tiny_model(args)
    torch.save(model.state_dict(), args.finetuned_model_path)
    vocab, merges = clip_tokenizer_files(workdir)

    def sd15(*_, torch_dtype=None, **__):
        plain_text_encoder = CLIPTextModel(CLIPTextConfig(**HPARAMS["text_encoder"]))  # replaced by the demo
        return StableDiffusionFastCompposerPipeline(
            vae=model.vae, text_encoder=plain_text_encoder, tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77),
            unet=model.unet, scheduler=PNDMScheduler(**SD15_PNDM), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    FastComposerModel.from_pretrained = staticmethod(lambda _args: tiny_model(_args))
    StableDiffusionFastCompposerPipeline.from_pretrained = staticmethod(sd15)
    demo.CLIPTokenizer = SimpleNamespace(from_pretrained=lambda *_, **__: CLIPTokenizer(vocab, merges, model_max_length=77))
    pipe = demo.convert_model_to_pipeline(args, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, model.state_dict()


def reference_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8): a few random gradients, so resizing has something to average."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * (a * x + b * y) + c) for a, b, c in rng.normal(size=(3, 3))]
    image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@torch.no_grad()
def run_case(pipe, case: dict, tensors: dict[str, torch.Tensor]) -> dict:
    from PIL import Image

    name, prompt = case["name"], case["prompt"]
    image = reference_image(*case["reference_hw"], case["seed"])
    x_t = torch.randn((1, 4, CALL["height"] // 8, CALL["width"] // 8), generator=torch.Generator().manual_seed(case["seed"]))
    record: dict[str, list] = {"pixels": [], "object": [], "postfuse_in": [], "postfuse_out": [], "mask": [], "text": [],
                               "steps": []}

    def before_postfuse(module, inputs):  # (text_embeds, object_embeds, image_token_mask, num_objects);
        record["postfuse_in"].append(inputs[0].clone())  # before: the official fusion writes into text_embeds
        record["mask"].append(inputs[2].clone())

    hooks = [
        pipe.postfuse_module.register_forward_pre_hook(before_postfuse),
        pipe.postfuse_module.register_forward_hook(lambda m, a, out: record["postfuse_out"].append(out.clone())),
        pipe.image_encoder.vision_model.register_forward_pre_hook(lambda m, a: record["pixels"].append(a[0].clone())),
        pipe.image_encoder.register_forward_hook(lambda m, a, out: record["object"].append(out.clone())),
    ]
    encode_prompt, step = pipe._encode_prompt, pipe.scheduler.step

    def recorded_encode_prompt(*a, **k):
        out = encode_prompt(*a, **k)
        record["text"].append(out.clone())
        return out

    def recorded_step(model_output, timestep, sample, **k):
        out = step(model_output, timestep, sample, **k)
        record["steps"].append((int(timestep), model_output.clone(), out.prev_sample.clone()))
        return out

    pipe._encode_prompt, pipe.scheduler.step = recorded_encode_prompt, recorded_step
    try:
        latents = pipe(prompt=prompt, reference_subject_images=[Image.fromarray(image)], alpha_=case["alpha"],
                       latents=x_t.clone(), output_type="latent", height=CALL["height"], width=CALL["width"],
                       num_inference_steps=CALL["num_inference_steps"], guidance_scale=CALL["guidance_scale"]).images
    finally:
        pipe._encode_prompt, pipe.scheduler.step = encode_prompt, step
        for hook in hooks:
            hook.remove()
    assert all(len(record[k]) == 1 for k in ("pixels", "object", "postfuse_in", "text")), "one call each"

    subject_ids, image_token_mask = pipe._tokenize_and_mask_noun_phrases_ends(prompt)
    assert torch.equal(image_token_mask, record["mask"][0].cpu())
    text_ids = pipe.tokenizer(prompt.replace("img", ""), padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    negative, text_only = record["text"][0].chunk(2)
    timesteps = [t for t, _, _ in record["steps"]]
    outputs = {
        "reference_image": torch.from_numpy(image), "x_T": x_t,
        "subject_input_ids": subject_ids, "text_input_ids": text_ids, "image_token_mask": image_token_mask,
        "object_pixel_values": record["pixels"][0], "object_embeds": record["object"][0].reshape(1, -1),
        "negative_embeds": negative, "text_embeds": text_only,
        "subject_embeds": record["postfuse_in"][0], "augmented_embeds": record["postfuse_out"][0],
        "noise_pred": torch.stack([n for _, n, _ in record["steps"]]),
        "step_latents": torch.stack([x for _, _, x in record["steps"]]), "latents": latents,
    }
    for key, tensor in outputs.items():
        tensors[f"{name}/{key}"] = tensor.detach().contiguous()
    return {**case, "image_token_index": int(image_token_mask[0].nonzero()[0, 0]), "timesteps": timesteps,
            "start_subject_step": (1 - case["alpha"]) * CALL["num_inference_steps"],
            "tensors": {key: f"{name}/{key}" for key in outputs}}


def cut_token_table(state_dict: dict, tensors: dict) -> dict:
    """The state dict with its 49408-row text token table (1.6 MB) cut to the rows the cases look up,
    `<table>.rows` at `<table>.ids`; the check rebuilds it with zeros elsewhere (no output reads another row)."""
    ids = sorted({int(i) for name, t in tensors.items() if name.endswith("_input_ids") for i in t.flatten()})
    out = {k: v for k, v in state_dict.items() if k != f"{TOKEN_TABLE}.weight"}
    out[f"{TOKEN_TABLE}.rows"] = state_dict[f"{TOKEN_TABLE}.weight"][ids].contiguous()
    out[f"{TOKEN_TABLE}.ids"] = torch.tensor(ids)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="a checkout of mit-han-lab/fastcomposer")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, state_dict = authors_pipeline(args.authors_repo.resolve(), Path(tmp))
        tensors: dict[str, torch.Tensor] = {}
        cases = [run_case(pipe, case, tensors) for case in CASES]
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in cut_token_table(state_dict, tensors).items()},
              str(args.out / "state_dict.safetensors"))
    save_file(tensors, str(args.out / "cases.safetensors"))
    (args.out / "hparams.json").write_text(json.dumps({**HPARAMS, "scheduler": SD15_PNDM}, indent=1) + "\n")
    shapes = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}
    (args.out / "cases.json").write_text(json.dumps({"variant": HPARAMS["variant"], "call": CALL, "cases": cases,
                                                     "shapes": shapes}, indent=1) + "\n")
    print(f"wrote {len(state_dict)} weights and {len(tensors)} case tensors to {args.out}")


if __name__ == "__main__":
    main()

"""Make the PhotoMaker (v1, v2) known-answer vectors by running the authors' code on tiny random weights.

    python make_vectors.py --authors-repo /path/to/TencentARC/PhotoMaker [--out DIR]

Runs in an environment with the authors' dependencies (see README.md: torch, diffusers 0.29, transformers
4.44, peft, open_clip_torch for the CLIP BPE file); the authors' `photomaker` package is imported from
`--authors-repo` without its `__init__` (which imports insightface, used only for face detection, not
tested here). What runs is the authors' `PhotoMakerStableDiffusionXLPipeline` (`load_photomaker_adapter`,
`encode_prompt_with_trigger_word`, `__call__` with its start-merge switch), their `FuseModule`, `MLP`,
`QFormerPerceiver`, `FacePerceiverResampler` and the forwards of both ID encoders. Only the sizes are
tiny: the ID encoders' constructors hard-code CLIP ViT-L/14 and 2048-d fusion, so `tiny_id_encoder`
assembles the same submodules at tiny sizes (the perceiver's dim_head 128 becomes 32).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

SEED = 0
VISION = {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TEXT_DIM = 32
EMBED_DIM = 2 * TEXT_DIM  # the UNet's cross-attention width = the fused token width (SDXL: 2048)
PERCEIVER_DIM_HEAD = 32
ARCFACE_DIM = 512
LORA_RANK = 4
TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": TEXT_DIM, "intermediate_size": 2 * TEXT_DIM,
                "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77}
TEXT_ENCODERS = {"text_encoder": {**TEXT_ENCODER, "hidden_act": "quick_gelu"},
                 "text_encoder_2": {**TEXT_ENCODER, "hidden_act": "gelu", "projection_dim": TEXT_DIM}}
TIME_EMBED_DIM = 8
UNET = {"sample_size": 8, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4], "use_linear_projection": True, "transformer_layers_per_block": [1, 1],
        "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_DIM, "cross_attention_dim": EMBED_DIM}
# SDXL-base's scheduler_config.json; the authors' README and scripts swap in EulerDiscreteScheduler.
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
             "interpolation_type": "linear", "use_karras_sigmas": False}
# SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>.
TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
HEIGHT = WIDTH = 64
NEGATIVE = "(asymmetry, worst quality, low quality, illustration), open mouth"
CASES = (
    # name, prompt, negative prompt, ID images (indices into the stored ones), start_merge_step, steps, guidance
    ("man_img_2ids", "a photo of a man img", None, [0, 1], 1, 3, 5.0),
    ("man_img_comma_1id", "a photo of a man img, cyberpunk style", NEGATIVE, [1], 0, 3, 5.0),
)
ID_IMAGE_SIZES = ((40, 48), (52, 36))  # (W, H) of the two ID photos: not square, not the tower's size


def import_authors(repo: Path):
    """The authors' photomaker package from `repo`, its submodules imported without the package __init__."""
    package = types.ModuleType("photomaker")
    package.__path__ = [str(repo / "photomaker")]
    sys.modules["photomaker"] = package
    model = importlib.import_module("photomaker.model")
    model_v2 = importlib.import_module("photomaker.model_v2")
    package.PhotoMakerIDEncoder = model.PhotoMakerIDEncoder
    package.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken = model_v2.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken
    pipeline = importlib.import_module("photomaker.pipeline")
    return types.SimpleNamespace(model=model, model_v2=model_v2, pipeline=pipeline)


def clip_tokenizer(pad_token: str):
    """The openai/clip-vit-large-patch14 tokenizer from open_clip's bundled BPE file (OpenAI's vocab order),
    as the project's `clip_tokenizer`; written to vocab.json / merges.txt for this transformers version."""
    import gzip
    import tempfile

    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad_token)


@torch.no_grad()
def redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights ~ N(0, 1/fan_in), biases and norm shifts ~ N(0, 0.1²), norm scales ~ 1 + N(0, 0.1²), then
    rounded to float16 values (stored as float16, computed in float32). Nothing zero-initialised stays zero."""
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm = any(tag in name for tag in ("norm", "layer_norm", "ln_", "layernorm"))
        if param.ndim == 1 and is_norm and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif param.ndim == 1:
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(math.prod(param.shape[1:]))
        param.copy_(value.half().float())


def tiny_id_encoder(authors, version: str):
    """The authors' ID encoder class with its submodules at tiny sizes (their __init__ hard-codes ViT-L / 2048)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hidden = VISION["hidden_size"]
    if version == "v1":
        encoder = authors.model.PhotoMakerIDEncoder.__new__(authors.model.PhotoMakerIDEncoder)
        CLIPVisionModelWithProjection.__init__(encoder, CLIPVisionConfig(**VISION))
        encoder.visual_projection_2 = torch.nn.Linear(hidden, EMBED_DIM - VISION["projection_dim"], bias=False)
        encoder.fuse_module = authors.model.FuseModule(EMBED_DIM)
        return encoder
    cls = authors.model_v2.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken
    encoder = cls.__new__(cls)
    CLIPVisionModelWithProjection.__init__(encoder, CLIPVisionConfig(**VISION))
    encoder.fuse_module = authors.model_v2.FuseModule(EMBED_DIM)
    encoder.visual_projection_2 = torch.nn.Linear(hidden, EMBED_DIM - VISION["projection_dim"], bias=False)
    encoder.num_tokens = 2
    encoder.cross_attention_dim = EMBED_DIM
    resampler = authors.model_v2.FacePerceiverResampler
    authors.model_v2.FacePerceiverResampler = lambda **kw: resampler(
        **{**kw, "dim_head": PERCEIVER_DIM_HEAD, "heads": kw["dim"] // PERCEIVER_DIM_HEAD})
    try:
        encoder.qformer_perceiver = authors.model_v2.QFormerPerceiver(ARCFACE_DIM, EMBED_DIM, 2, embedding_dim=hidden)
    finally:
        authors.model_v2.FacePerceiverResampler = resampler
    return encoder


def tiny_lora(unet, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random LoRA weights in the checkpoint's key format (attention-processor LoRA of every attention)."""
    lora = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        for proj, linear in (("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v),
                             ("to_out", attention.to_out[0])):
            down = torch.randn(LORA_RANK, linear.in_features, generator=generator) / linear.in_features ** 0.5
            up = torch.randn(linear.out_features, LORA_RANK, generator=generator) / LORA_RANK
            lora[f"unet.{name}.{proj}_lora.down.weight"] = down.half().float()
            lora[f"unet.{name}.{proj}_lora.up.weight"] = up.half().float()
    return lora


def sdxl_components(generator: torch.Generator) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODERS["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODERS["text_encoder_2"]))
    for module in (unet, text_encoder, text_encoder_2):
        redraw(module, generator)
    # Not stored, never run: output_type="latent" stops before decoding; it sets the 8x latent scale.
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8)
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "text_encoder_2": text_encoder_2.eval(),
            "tokenizer": clip_tokenizer(TOKENIZER_PADS["tokenizer"]),
            "tokenizer_2": clip_tokenizer(TOKENIZER_PADS["tokenizer_2"]), "unet": unet.eval(),
            "scheduler": EulerDiscreteScheduler(**SCHEDULER)}


def used_token_ids(components: dict) -> list[int]:
    """Every id the text encoders can see in the cases: the prompts' words, BOS / EOS and both pad ids."""
    texts = [p for _, prompt, negative, *_ in CASES for p in (prompt.replace(" img", ""), negative or "")]
    ids = {0}
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = components[name]
        ids |= {i for text in texts for i in tokenizer(text).input_ids} | {tokenizer.pad_token_id}
    return sorted(ids)


def sparse_text_encoders(components: dict, ids: list[int]) -> dict[str, torch.Tensor]:
    """The text encoders' weights with the token embedding kept only at `ids` (zero elsewhere, in the model
    too): `<prefix>.token_embedding.rows` [K, D] and `.ids` [K] instead of the 49408-row table."""
    tensors = {}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = components[name]
        table = encoder.text_model.embeddings.token_embedding.weight
        with torch.no_grad():
            kept = table[ids].clone()
            table.zero_()
            table[ids] = kept
        for key, value in encoder.state_dict().items():
            if key == "text_model.embeddings.token_embedding.weight":
                tensors[f"{name}.token_embedding.rows"] = kept
                tensors[f"{name}.token_embedding.ids"] = torch.tensor(ids, dtype=torch.int64)
            elif not key.endswith("position_ids"):
                tensors[f"{name}.{key}"] = value
    return tensors


class Recorder:
    """Hooks that log what the authors' pipeline feeds its modules and gets back, call by call."""

    def __init__(self, pipe) -> None:
        self.unet_calls: list[dict] = []
        self.id_encoder_calls: list[dict] = []
        self.fuse_calls: list[dict] = []
        self.text_encoder_ids: dict[str, list[torch.Tensor]] = {"tokenizer": [], "tokenizer_2": []}
        self.handles = [
            pipe.text_encoder.register_forward_pre_hook(lambda m, args: self.text_encoder_ids["tokenizer"].append(args[0])),
            pipe.text_encoder_2.register_forward_pre_hook(lambda m, args: self.text_encoder_ids["tokenizer_2"].append(args[0])),
            pipe.unet.register_forward_pre_hook(self._unet_in, with_kwargs=True),
            pipe.unet.register_forward_hook(self._unet_out),
            pipe.id_encoder.register_forward_pre_hook(self._id_in, with_kwargs=True),
            pipe.id_encoder.register_forward_hook(self._id_out),
            pipe.id_encoder.fuse_module.register_forward_pre_hook(self._fuse_in),
        ]

    def _unet_in(self, module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        self.unet_calls.append({"sample": args[0].clone(), "timestep": torch.as_tensor(args[1]).float().reshape(1),
                                "encoder_hidden_states": kwargs["encoder_hidden_states"].clone(),
                                "text_embeds": added["text_embeds"].clone(), "time_ids": added["time_ids"].clone()})

    def _unet_out(self, module, args, output):
        self.unet_calls[-1]["noise_pred"] = output[0].clone()

    def _id_in(self, module, args, kwargs):
        # prompt_embeds is written in place by FuseModule.masked_scatter_: keep the value it came with.
        self.id_encoder_calls.append({"id_pixel_values": args[0].clone(), "prompt_embeds_in": args[1].clone(),
                                      "class_tokens_mask": args[2].clone(),
                                      **({"id_embeds": args[3].clone()} if len(args) > 3 else {})})

    def _id_out(self, module, args, output):
        self.id_encoder_calls[-1]["prompt_embeds_fused"] = output.clone()

    def _fuse_in(self, module, args):
        self.fuse_calls.append({"id_tokens": args[1].clone()})

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_case(authors, pipe, case, version: str, inputs: dict, tensors: dict) -> dict:
    name, prompt, negative, image_indices, start_merge_step, steps, guidance = case
    images = [Image.fromarray(inputs[f"id_image_{i}"].numpy()) for i in image_indices]
    id_embeds = inputs["arcface_id_embeds"][image_indices] if version == "v2" else None
    encoded = {}
    original_encode = pipe.encode_prompt

    def encode_prompt(**kwargs):  # the text-only branch: the prompt the authors decode without the trigger
        encoded["prompt_text_only"] = kwargs["prompt"]
        return original_encode(**kwargs)

    pipe.encode_prompt = encode_prompt
    latents_after = []

    def on_step_end(_pipe, step, t, kwargs):
        latents_after.append(kwargs["latents"].clone())
        return {}

    recorder = Recorder(pipe)
    try:
        result = pipe(prompt=prompt, negative_prompt=negative, input_id_images=images, id_embeds=id_embeds,
                      start_merge_step=start_merge_step, num_inference_steps=steps, guidance_scale=guidance,
                      height=HEIGHT, width=WIDTH, latents=inputs["x_T"].clone(), output_type="latent",
                      callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        recorder.close()
        del pipe.encode_prompt
    (id_call,), (fuse_call,) = recorder.id_encoder_calls, recorder.fuse_calls
    key = f"{version}/{name}"
    mask = id_call["class_tokens_mask"]
    stored = {
        "id_pixel_values": id_call["id_pixel_values"],
        "prompt_embeds_with_class_tokens": id_call["prompt_embeds_in"],
        "class_tokens_mask": mask.to(torch.int64),
        "id_tokens": fuse_call["id_tokens"],
        "prompt_embeds_fused": id_call["prompt_embeds_fused"],
        "latents_after_step": torch.stack(latents_after),
        "final_latents": result.images,
    }
    for field in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "noise_pred"):
        stored[f"unet_{field}"] = torch.stack([call[field] for call in recorder.unet_calls])
    for tokenizer_name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, tokenizer_name)
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        stored[f"{tokenizer_name}_prompt_ids"] = torch.tensor(ids)  # with the trigger's added-token id
        # what the text encoder saw in the trigger-word branch (its first call): trigger out, class token repeated
        stored[f"{tokenizer_name}_class_expanded_ids"] = recorder.text_encoder_ids[tokenizer_name][0][0]
        stored[f"{tokenizer_name}_text_only_ids"] = torch.tensor(
            tokenizer(encoded["prompt_text_only"], padding="max_length", max_length=77, truncation=True).input_ids)
    for field, value in stored.items():
        tensors[f"{key}/{field}"] = value.contiguous()
    class_positions = mask[0].nonzero().flatten().tolist()
    return {
        "name": name, "version": version, "prompt": prompt, "negative_prompt": negative,
        "id_images": [f"id_image_{i}" for i in image_indices],
        "arcface_id_embeds_rows": image_indices if version == "v2" else None,
        "start_merge_step": start_merge_step, "num_inference_steps": steps, "guidance_scale": guidance,
        "height": HEIGHT, "width": WIDTH, "x_T": "inputs/x_T",
        "prompt_text_only": encoded["prompt_text_only"],
        "class_token_index": class_positions[0], "class_token_positions": class_positions,
        "timesteps": [float(t) for t in pipe.scheduler.timesteps],
        "tensors": {field: f"{key}/{field}" for field in stored},
        "shapes": {field: list(value.shape) for field, value in stored.items()},
    }


def make(authors, out: Path, version: str, components: dict, inputs: dict, tensors: dict, lora_generator) -> list[dict]:
    from transformers import CLIPImageProcessor

    pipeline_module = authors.pipeline
    generator = torch.Generator().manual_seed(SEED + (1 if version == "v1" else 2))
    encoder = tiny_id_encoder(authors, version)
    redraw(encoder, generator)
    lora = tiny_lora(components["unet"], lora_generator)
    weights = {f"id_encoder.{k}": v.half() for k, v in encoder.state_dict().items()}
    weights |= {f"lora_weights.{k}": v.half() for k, v in lora.items()}
    weight_name = f"photomaker-{version}.safetensors"
    save_file(weights, str(out / weight_name))

    pipe = pipeline_module.PhotoMakerStableDiffusionXLPipeline(**copy.deepcopy(components))  # LoRA fused per version
    pipe.set_progress_bar_config(disable=True)
    # load_photomaker_adapter builds the full-size encoder class by name: hand it the tiny one instead.
    saved = pipeline_module.PhotoMakerIDEncoder, pipeline_module.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken
    pipeline_module.PhotoMakerIDEncoder = lambda: tiny_id_encoder(authors, "v1")
    pipeline_module.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken = lambda: tiny_id_encoder(authors, "v2")
    try:
        pipe.load_photomaker_adapter(str(out), weight_name=weight_name, trigger_word="img", pm_version=version)
    finally:
        pipeline_module.PhotoMakerIDEncoder, pipeline_module.PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken = saved
    if version == "v1":
        # HEAD hard-codes num_tokens = 2 for both versions, which crashes v1 (issues #182, #187, #193);
        # v1's own code (commit ccd1f7c, before v2) repeats the class token once per ID image.
        pipe.num_tokens = 1
    pipe.id_image_processor = CLIPImageProcessor(size=VISION["image_size"], crop_size=VISION["image_size"])
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.fuse_lora()  # as the README and inference_pmv2.py
    check_lora_fused(pipe.unet, base, lora)
    for key, value in pipe.id_encoder.state_dict().items():  # strict load of the stored file
        assert torch.equal(value, encoder.state_dict()[key]), key
    return [run_case(authors, pipe, case, version, inputs, tensors) for case in CASES]


def check_lora_fused(unet, base: dict, lora: dict) -> None:
    """Every attention projection became W + up · down (scale 1: no alpha in this format)."""
    params = dict(unet.named_parameters())
    for key, down in lora.items():
        if not key.endswith("_lora.down.weight"):
            continue
        module = key.removeprefix("unet.").removesuffix("_lora.down.weight").replace(".processor.", ".")
        if module.endswith("to_out"):
            module += ".0"
        up = lora[key.replace(".down.", ".up.")]
        weight = next(v for n, v in params.items() if n in (f"{module}.weight", f"{module}.base_layer.weight"))
        base_weight = next(v for n, v in base.items() if n in (f"{module}.weight", f"{module}.base_layer.weight"))
        assert torch.allclose(weight, base_weight + up @ down, atol=1e-6), module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="checkout of TencentARC/PhotoMaker")
    parser.add_argument("--authors-commit", help="the checkout's commit (default: git rev-parse HEAD in it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    commit = args.authors_commit or subprocess.run(["git", "-C", str(args.authors_repo), "rev-parse", "HEAD"],
                                                   capture_output=True, text=True, check=True).stdout.strip()
    torch.set_num_threads(2)
    authors = import_authors(args.authors_repo.resolve())
    generator = torch.Generator().manual_seed(SEED)
    components = sdxl_components(generator)
    sdxl = {f"unet.{k}": v for k, v in components["unet"].state_dict().items()}
    sdxl |= sparse_text_encoders(components, used_token_ids(components))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sdxl.items()}, str(args.out / "sdxl_tiny.safetensors"))

    inputs = {"x_T": torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=generator),
              # stands for insightface's raw (un-normalised) face.embedding, norm ≈ 20 like the real ones
              "arcface_id_embeds": torch.randn(len(ID_IMAGE_SIZES), ARCFACE_DIM, generator=generator)}
    for i, (w, h) in enumerate(ID_IMAGE_SIZES):
        inputs[f"id_image_{i}"] = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
    tensors = {f"inputs/{k}": v for k, v in inputs.items()}
    lora_generator = torch.Generator().manual_seed(SEED + 3)
    cases = [c for version in ("v1", "v2") for c in make(authors, args.out, version, components, inputs, tensors, lora_generator)]
    save_file(tensors, str(args.out / "cases.safetensors"))
    import diffusers
    import transformers

    hparams = {"vision": VISION, "embed_dim": EMBED_DIM, "perceiver_dim_head": PERCEIVER_DIM_HEAD,
               "lora_rank": LORA_RANK, "text_encoders": TEXT_ENCODERS, "tokenizer_pad_tokens": TOKENIZER_PADS,
               "unet": UNET, "scheduler": SCHEDULER, "trigger_word": "img",
               "id_image_processor": {"size": VISION["image_size"], "crop_size": VISION["image_size"]}}
    (args.out / "hparams.json").write_text(json.dumps(hparams, indent=1) + "\n")
    meta = {"authors_repo": "TencentARC/PhotoMaker", "authors_commit": commit, "environment": {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "threads": torch.get_num_threads()}, "cases": cases}
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    for path in sorted(args.out.glob("*.safetensors")):
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""Scoring protocols: the conventions that differ between FastComposer's evaluation and this project's.

CapHuman's paper scores ID similarity and CLIP score as FastComposer does (mit-han-lab/fastcomposer
`evaluation/single_object/single_object_evaluation.py` and `evaluation/clip_eval.py`). Every metric computes
both protocols on one code path; the scoring option `protocol` (`score --protocol`) picks the options:

| option            | fastcomposer (default: the paper's columns)                | caphuman-bench (the project's own)        |
|-------------------|------------------------------------------------------------|--------------------------------------------|
| several faces     | largest box (`MTCNN(keep_all=True)`, select_largest, `[:1]`) | most confident face                      |
| cosine            | `max(cos, 0)`                                              | signed cosine                              |
| large images      | MTCNN at full size                                         | downscaled to 2048 px a side, boxes mapped back |
| CLIP text         | the prompt with the identity's class word ("a man …")      | the prompt with "a person"                 |
| CLIP image        | `ToTensor()·2−1`, un-normalised, tensor `Resize(224, bicubic)` (torchvision 0.14, cog.yaml: no antialias), `CenterCrop`, OpenAI mean/std | PIL: bicubic resize, centre crop, mean/std (open_clip) |
| CLIP precision    | fp16 on CUDA (OpenAI `clip.load` on a GPU), fp32 on the CPU | fp32                                      |
| head_control crop | DECA's default: `kpt68` square of 68 landmarks (FAN; dlib stand-in) | DECA's 'bbox' rule on MTCNN's box   |

Unchanged between them: MTCNN(image_size=160, margin=0, thresholds (0.6, 0.7, 0.7), factor 0.709), the
VGGFace2 InceptionResnetV1, a generated image without a face scores 0 (option no_face=zero), the mean over
images. Spread: results report the sample std (ddof 1); FastComposer prints `np.std` (ddof 0), smaller by
a factor sqrt((n − 1) / n).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.detection import DETECT_MAX_SIDE, FaceDetection, detect_faces

DEFAULT_PROTOCOL = "fastcomposer"


@dataclass(frozen=True)
class ScoringProtocol:
    name: str
    face: str  # which face of several: "largest" | "most_confident"
    clamp_cosine: bool  # max(cos, 0)
    detect_max_side: int | None  # None: MTCNN sees the full-size image
    clip_text: str  # "subject": the identity's class phrase | "neutral": "a person"
    clip_image: str  # "tensor": FastComposer's tensor preprocessing | "pil": open_clip's
    clip_fp16_on_cuda: bool
    deca_crop: str  # head_control's crop: "kpt68" | "mtcnn"

    def detect(self, images: list[Image.Image], device: str, weights_dir: str | Path | None) -> list[FaceDetection | None]:
        """MTCNN's faces of each image, the protocol's face first (None where there is none)."""
        found = detect_faces(images, device, weights_dir, max_side=self.detect_max_side)
        return [None if d is None else d.choose(self.face) for d in found]

    def similarity(self, cosine: float) -> float:
        return max(cosine, 0.0) if self.clamp_cosine else cosine

    def describe(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    "fastcomposer": ScoringProtocol("fastcomposer", "largest", True, None, "subject", "tensor", True, "kpt68"),
    "caphuman-bench": ScoringProtocol("caphuman-bench", "most_confident", False, DETECT_MAX_SIDE, "neutral", "pil", False, "mtcnn"),
}

PROTOCOL_CONVENTION = {
    "protocol": "scoring option 'protocol' (scored_with.<family>.protocol names the one used): "
                + "; ".join(f"{name}: {p.describe()}" for name, p in PROTOCOLS.items()),
    "std": "results give the sample std (ddof 1); FastComposer prints np.std (ddof 0) = std * sqrt((n-1)/n)",
}


def scoring_protocol(options: dict) -> ScoringProtocol:
    """The protocol the scoring options ask for (default fastcomposer)."""
    name = options.get("protocol") or DEFAULT_PROTOCOL
    if name not in PROTOCOLS:
        raise BenchError(f"scoring option 'protocol': {name!r} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]

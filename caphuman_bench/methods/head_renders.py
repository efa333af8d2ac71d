"""Per-run head renders shared by the methods steered by a rendered 3D head (CapHuman, IP-Adapter + ControlNet).

Per identity, once per run (cached under the run's `cache/method/`): the reference's DECA code (FLAME's
neutral code when the adapter has no DECA encoder, i.e. the tiny setting). Per identity × head
condition: the head render of that code mixed with the condition (`params["mixing"]`, CapHuman's
`--modes`), whose mixed code is also the head-control target the method was steered to.

A subclass sets `self.renderer` (a `HeadConditionRenderer`), `self.deca` (DECA encoder or None),
`self.mtcnn` (face box for DECA's crop; unused without DECA) and `self._codes = {}` in its `load`.

Normal map convention: ControlNet 1.1's normalbae annotator (controlnet_aux `NormalBaeDetector`) writes
the BAE network's camera-space normal n as RGB = (n + 1) / 2 · 255; BAE predicts ScanNet-protocol
normals (x to the image's left, y down, z towards the camera: a frontal face is (128, 128, 255)). Our
renderer's normals are DECA/FLAME's (x to the image's right, y up, z towards the camera), so
x and y flip sign. Outside the head the normal is 0, i.e. mid-grey.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from caphuman_bench.faces.memo import BoundedMemo


def normals_to_controlnet_image(normal: np.ndarray) -> Image.Image:
    """Renderer normals [3, H, W] (x right, y up, z to the camera; 0 outside the head) → normalbae RGB."""
    scannet = normal * np.array([-1.0, -1.0, 1.0], dtype=np.float32)[:, None, None]
    rgb = np.clip((scannet + 1.0) * 0.5 * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(rgb.transpose(1, 2, 0), mode="RGB")


RENDER_MEMO = 64  # a 512² render holds ~10 MB; tasks come identity by identity


class HeadRenderMixin:
    def _cache_path(self, folder: str, *parts: str) -> Path | None:
        """`<workdir>/<folder>/<parts...>` with its parent folder created; None without a workdir."""
        if self.context.workdir is None:
            return None
        path = Path(self.context.workdir, folder, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _fingerprint(self, reference: Image.Image) -> str:
        """The reference's pixels and the model setting: a cached entry is valid only for both."""
        h = hashlib.sha256(np.asarray(reference.convert("RGB")).tobytes())
        h.update(f"{reference.size}|tiny={bool(self.params.get('tiny'))}|{self.params.get('backbone')}".encode())
        return h.hexdigest()[:16]

    def identity_code(self, identity_id: str, reference: Image.Image) -> dict[str, np.ndarray]:
        """The reference's DECA code (FLAME's neutral code in the tiny setting)."""
        from caphuman_bench.render.head_condition import check_code, neutral_identity_code

        if identity_id in self._codes:
            return self._codes[identity_id]
        if self.deca is None:
            code = neutral_identity_code()
        else:
            path = self._cache_path("deca", f"{identity_id}.{self._fingerprint(reference)}.npz")
            if path is not None and path.exists():
                with np.load(path, allow_pickle=False) as data:
                    code = {k: data[k] for k in data.files}
            else:
                code = self._encode_deca(reference)
                if path is not None:
                    tmp = path.with_suffix(".tmp.npz")
                    np.savez(tmp, **code)
                    os.replace(tmp, path)
        self._codes[identity_id] = check_code(code, f"identity {identity_id!r} DECA code")
        return self._codes[identity_id]

    def _encode_deca(self, reference: Image.Image) -> dict[str, np.ndarray]:
        """DECA on the MTCNN face box; like DECA's TestData, the whole photo when no face is found."""
        from caphuman_bench.models.deca_encoder import encode_images

        def box(image: Image.Image):
            boxes, _ = self.mtcnn.detect(image.convert("RGB"))
            return boxes[0] if boxes is not None else (0, 0, image.width - 1, image.height - 1)

        return encode_images(self.deca, [reference], box)[0]

    def head_render(self, identity_id: str, reference: Image.Image, condition, size: int):
        """The head render of one identity × condition; `render_cached` re-renders if any input changed.

        Kept in memory too (the last RENDER_MEMO): every task of an identity × condition needs the
        same render, and reading the compressed file back costs ~0.1 s, seconds per batch of 32."""
        code = self.identity_code(identity_id, reference)
        mixing = str(self.params.get("mixing", "position,pose"))
        if not hasattr(self, "_renders"):
            self._renders = BoundedMemo(RENDER_MEMO)
        key = (identity_id, condition.id, mixing, size)
        render = self._renders.get(key)
        if render is None:
            folder = self._cache_path("render", identity_id, condition.id)
            if folder is None:
                render = self.renderer.render(code, condition, mixing, size)
            else:
                render = self.renderer.render_cached(code, condition, folder, mixing, size)
            self._renders.put(key, render)
        return render

    def head_target(self, identity_id: str, reference: Image.Image, condition) -> dict[str, np.ndarray]:
        """The mixed code the method was steered to (the reference's, with the mixed-in condition parts)."""
        size = int(self.params.get("height", 512))
        return dict(self.head_render(identity_id, reference, condition, size).target)

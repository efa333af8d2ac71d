"""DECA's E_flame port: the reference layout, strict loading, the 236-way split, DECA's crop."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caphuman_bench.errors import BenchError
from caphuman_bench.models.deca_encoder import (
    CODE_SIZE,
    DecaEncoder,
    bbox2point,
    deca_crop,
    decompose,
    encode_images,
    load_deca_encoder,
)

LAYOUT = Path(__file__).parent / "data" / "deca_encoder_layout.tsv"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def reference_layout() -> list[tuple[str, list[int], torch.dtype]]:
    with LAYOUT.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [(r["key"], [int(v) for v in r["shape"].strip("[]").split(",") if v.strip()], DTYPES[r["dtype"]]) for r in rows]


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of exactly the listed keys, shapes and dtypes (as a real deca_model.tar has)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in reference_layout():
        if dtype == torch.int64:
            state[key] = torch.randint(0, 1000, shape, generator=generator, dtype=dtype)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, state) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save({"E_flame": state, "E_detail": {"layers.0.weight": torch.zeros(2)}}, path)
    return path, state


def test_model_layout_is_the_reference_layout():
    expected = [(key, shape, dtype) for key, shape, dtype in reference_layout()]
    actual = [(key, list(v.shape), v.dtype) for key, v in DecaEncoder().state_dict().items()]
    assert len(expected) == 322
    assert actual == expected


def test_strict_load_and_236_outputs_sliced(checkpoint):
    path, state = checkpoint
    encoder = load_deca_encoder(path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    crops = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        code = encoder(crops)
        # Independent forward: DECA's trunk written out (7x7 average pool of layer4) + the MLP by hand.
        trunk = encoder.encoder
        x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(crops))))
        x = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))
        feature = torch.nn.functional.avg_pool2d(x, 7, stride=1).flatten(1)
        hidden = torch.relu(feature @ state["layers.0.weight"].T + state["layers.0.bias"])
        expected = hidden @ state["layers.2.weight"].T + state["layers.2.bias"]
    assert code.shape == (2, CODE_SIZE)
    torch.testing.assert_close(code, expected, rtol=1e-4, atol=1e-5)
    parts = decompose(code)
    assert {k: tuple(v.shape) for k, v in parts.items()} == {
        "shape": (2, 100), "tex": (2, 50), "exp": (2, 50), "pose": (2, 6), "cam": (2, 3), "light": (2, 9, 3)}
    torch.testing.assert_close(torch.cat([parts[k].reshape(2, -1) for k in ("shape", "tex", "exp", "pose", "cam", "light")], 1), code)
    assert torch.equal(parts["exp"], code[:, 150:200]) and torch.equal(parts["light"][:, 1, 0], code[:, 212])


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("encoder.layer3.2.bn2.running_var"), "missing keys: encoder.layer3.2.bn2.running_var"),
        (lambda s: s.__setitem__("layers.3.weight", s.pop("layers.2.weight")), "layers.2.weight"),
        (lambda s: s.__setitem__("encoder.fc.weight", torch.zeros(1000, 2048)), "unexpected keys: encoder.fc.weight"),
        (lambda s: s.__setitem__("layers.2.bias", torch.zeros(200)), "layers.2.bias [200]"),
    ],
    ids=["missing", "renamed", "unexpected", "wrong-shape"],
)
def test_other_layouts_are_refused_by_name(tmp_path, state, change, named):
    state = dict(state)
    change(state)
    path = tmp_path / "deca_model.tar"
    torch.save({"E_flame": state}, path)
    with pytest.raises(BenchError, match="not DECA's E_flame layout") as info:
        load_deca_encoder(path)
    assert named in str(info.value)
    assert str(path) in str(info.value)


def test_checkpoint_without_e_flame_entry_is_named(tmp_path):
    path = tmp_path / "deca_model.tar"
    torch.save({"E_detail": {}}, path)
    with pytest.raises(BenchError, match=r"no entry 'E_flame' \(found: E_detail\)"):
        load_deca_encoder(path)


def test_crop_of_known_box_matches_decas_formula():
    """On a linear ramp bilinear sampling is exact, so every crop pixel has a closed form."""
    height, width = 300, 400
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = np.stack([xs / (width - 1), ys / (height - 1), 0.25 + 0.5 * (xs + ys) / (width + height - 2)], -1)
    image = Image.fromarray(np.round(ramp * 255).astype(np.uint8))
    pixels = np.asarray(image, dtype=np.float64) / 255
    box = (150.0, 80.0, 230.0, 180.0)  # x1, y1, x2, y2: 80 x 100
    crop = deca_crop(image, box).numpy()
    assert crop.shape == (3, 224, 224) and crop.dtype == np.float32

    # DECA bbox2point(type='bbox'): size 90, centre (190, 130 + 0.12 * 90), side int(1.25 * 90) = 112.
    side, cx, cy = 112, 190.0, 130.0 + 10.8
    rows, cols = np.mgrid[0:224, 0:224]
    src_x = cx - side / 2 + cols * side / 223
    src_y = cy - side / 2 + rows * side / 223
    x0, y0 = np.floor(src_x).astype(int), np.floor(src_y).astype(int)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    expected = ((1 - fy) * ((1 - fx) * pixels[y0, x0] + fx * pixels[y0, x0 + 1])
                + fy * ((1 - fx) * pixels[y0 + 1, x0] + fx * pixels[y0 + 1, x0 + 1]))
    np.testing.assert_allclose(crop.transpose(1, 2, 0), expected, atol=1e-5)


def test_crop_outside_the_image_is_black():
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    crop = deca_crop(image, (0, 0, 100, 100))  # side 125 around a centre moved down: overhangs
    assert crop[:, -1, :].max() == 0 and crop[:, 112, 112].min() == 1


def test_encode_images_returns_none_without_face(checkpoint):
    encoder = load_deca_encoder(checkpoint[0])
    images = [Image.new("RGB", (64, 64), (128, 128, 128)), Image.new("RGB", (64, 64), (10, 200, 30))]
    codes = encode_images(encoder, images, lambda image: None if image.getpixel((0, 0))[0] == 128 else (8, 8, 56, 56))
    assert codes[0] is None
    assert codes[1]["shape"].shape == (100,) and codes[1]["light"].shape == (9, 3)


def test_mtcnn_box_detector_gives_the_most_confident_face():
    from facenet_pytorch import MTCNN
    from skimage import data

    from caphuman_bench.models.deca_encoder import mtcnn_box_detector

    photo = Image.fromarray(data.astronaut())
    detector = mtcnn_box_detector()
    boxes, _ = MTCNN(select_largest=False).detect(photo)
    np.testing.assert_allclose(detector(photo), boxes[0].astype(np.float64), atol=1e-3)  # facenet gives dtype=object
    assert detector(Image.new("RGB", (200, 200), (255, 255, 255))) is None


def _decas_own_crop(pixels: np.ndarray, box) -> np.ndarray:
    """DECA's TestData steps on the whole photo: bbox2point, estimate_transform, warp of image / 255."""
    from skimage.transform import estimate_transform, warp

    left, top, right, bottom = box
    old_size = (right - left + bottom - top) / 2
    centre = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0 + old_size * 0.12])
    size = int(old_size * 1.25)
    src = np.array([[centre[0] - size / 2, centre[1] - size / 2], [centre[0] - size / 2, centre[1] + size / 2],
                    [centre[0] + size / 2, centre[1] - size / 2]])
    tform = estimate_transform("similarity", src, np.array([[0, 0], [0, 223], [223, 0]]))
    return warp(pixels / 255.0, tform.inverse, output_shape=(224, 224)).transpose(2, 0, 1)


BOXES = [(150, 80, 230, 180), (-30, -20, 60, 70), (350, 240, 420, 330), (0, 0, 400, 300), (600, 500, 700, 600)]


@pytest.mark.parametrize("darkest", [0, 60])  # 60: skimage clips partly outside samples up to the photo's minimum
@pytest.mark.parametrize("box", BOXES)
def test_crop_equals_decas_full_image_warp(box, darkest):
    """The host crop (skimage on the square's region) equals DECA's warp of the whole photo, box anywhere."""
    pixels = np.random.default_rng(3).integers(darkest, 256, size=(300, 400, 3), dtype=np.uint8)
    np.testing.assert_allclose(deca_crop(Image.fromarray(pixels), box).numpy(), _decas_own_crop(pixels, box), atol=1e-6, rtol=0)


def test_the_batched_gpu_crop_is_skimages_arithmetic_to_the_bit():
    """`_bilinear_warp` (what `deca_crops` runs on a GPU; here its operations on the CPU) equals skimage's
    whole-photo warp exactly in float64: photos of two sizes, dark floors that make the clip matter,
    boxes overhanging every edge or wholly outside."""
    from caphuman_bench.models.deca_encoder import _bilinear_warp, _square_transform

    rng = np.random.default_rng(4)
    photos = [rng.integers(darkest, 256, size=shape, dtype=np.uint8) for darkest, shape in
              [(0, (300, 400, 3)), (60, (300, 400, 3)), (1, (200, 200, 3))]]
    for photo in photos:
        squares = [bbox2point(l, r, t, b, "bbox") for l, t, r, b in BOXES]
        inverse = torch.from_numpy(np.stack([_square_transform(sq).inverse.params for sq in squares]))
        got = _bilinear_warp(torch.from_numpy(np.stack([photo] * len(squares))), inverse).numpy()
        for crop, box in zip(got, BOXES):
            assert np.array_equal(crop, _decas_own_crop(photo, box)), box


def test_an_encoder_is_loaded_once_per_file_and_device(checkpoint, tmp_path):
    path, state = checkpoint
    assert load_deca_encoder(path) is load_deca_encoder(path)  # a run's method and metric share it
    copy = tmp_path / "copy.tar"
    copy.write_bytes(path.read_bytes())
    assert load_deca_encoder(copy) is not load_deca_encoder(path)
    torch.save({"E_detail": {}}, copy)  # the file changed: read again, and refused
    with pytest.raises(BenchError, match="no entry 'E_flame'"):
        load_deca_encoder(copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_crops_on_a_gpu_equal_skimages_to_the_bit():
    from caphuman_bench.models.deca_encoder import deca_crops

    rng = np.random.default_rng(5)
    photos = [rng.integers(darkest, 256, size=(300, 400, 3), dtype=np.uint8) for darkest in (0, 60)]
    pairs = [(photo, box) for photo in photos for box in BOXES]
    squares = [bbox2point(l, r, t, b, "bbox") for _, (l, t, r, b) in pairs]
    got = deca_crops([Image.fromarray(photo) for photo, _ in pairs], squares, "cuda").numpy()
    for crop, (photo, box) in zip(got, pairs):
        assert np.array_equal(crop, _decas_own_crop(photo, box).astype(np.float32)), box

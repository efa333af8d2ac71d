"""What CapHuman's official inference feeds DECA and the renderer, checked against the transcribed formulas
(VamosC/CapHuman inference.py, libs/decalib/datasets/datasets.py TestData, libs/decalib/deca.py decode with
render_orig, libs/decalib/utils/tensor_cropper.py transform_points; face_alignment 1.4.1 for FAN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.transform import estimate_transform, resize

from caphuman_bench.errors import BenchError
from caphuman_bench.faces.detection import FaceDetection, _detection_input
from caphuman_bench.faces.landmarks import LandmarkDetector, dlib_landmarks, fan_crop_frame, heatmap_points
from caphuman_bench.models.deca_encoder import bbox2point, landmark_square, no_face_square, resize_as_testdata
from caphuman_bench.render.head_condition import CropFrame, HeadConditionRenderer, neutral_identity_code


def official_bbox2point(left, right, top, bottom, kind):
    """datasets.py TestData.bbox2point, then size = int(old_size * 1.25) as __getitem__ does."""
    if kind == "kpt68":
        old_size = (right - left + bottom - top) / 2 * 1.1
        center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
    else:
        old_size = (right - left + bottom - top) / 2
        center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0 + old_size * 0.12])
    return center, int(old_size * 1.25)


@pytest.mark.parametrize("seed", range(5))
def test_kpt68_square_is_decas_bbox2point_of_the_landmark_box(seed):
    rng = np.random.default_rng(seed)
    points = rng.uniform(50, 400, size=(68, 2)) * rng.uniform(0.2, 1.0, size=2)
    square = landmark_square(points)
    centre, side = official_bbox2point(points[:, 0].min(), points[:, 0].max(), points[:, 1].min(), points[:, 1].max(), "kpt68")
    np.testing.assert_allclose(square.centre, centre, rtol=0, atol=1e-12)
    assert square.side == side
    # tform: skimage's similarity from the square's corners to [0, 223]², as TestData builds it
    half = side / 2
    src = np.array([[centre[0] - half, centre[1] - half], [centre[0] - half, centre[1] + half], [centre[0] + half, centre[1] - half]])
    np.testing.assert_allclose(square.tform, estimate_transform("similarity", src, np.array([[0, 0], [0, 223], [223, 0]])).params, atol=1e-9)


def test_bbox_square_and_no_face_fallback_follow_testdata():
    square = bbox2point(10.0, 110.0, 20.0, 160.0, "bbox")
    centre, side = official_bbox2point(10.0, 110.0, 20.0, 160.0, "bbox")
    np.testing.assert_allclose(square.centre, centre)
    assert square.side == side
    # no face: left = 0, right = h - 1, top = 0, bottom = w - 1 (h and w swapped as in TestData), detector's kind
    fallback = no_face_square(width=300, height=200, kind="kpt68")
    centre, side = official_bbox2point(0, 199, 0, 299, "kpt68")
    np.testing.assert_allclose(fallback.centre, centre)
    assert fallback.side == side


def test_resize_as_testdata_stretches_and_truncates():
    """skimage resize to size², anti-aliased, then (· 255).astype(uint8): a CelebA 178 × 218 photo is stretched
    and values are truncated, not rounded."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    ours = np.asarray(resize_as_testdata(Image.fromarray(photo), 512))
    exact = resize(photo, (512, 512), anti_aliasing=True) * 255.0
    assert ours.shape == (512, 512, 3)
    np.testing.assert_array_equal(ours, exact.astype(np.uint8))
    assert (np.round(exact).astype(np.uint8) != ours).mean() > 0.1  # rounding would differ on many pixels


def _official_transform_points(points, tform_params, crop=224, out=(512, 512)):
    """tensor_cropper.transform_points(points, inverse(tform).T, [224, 224], [h, w]) as deca.decode calls it."""
    points_2d = (points[:, :2] * 0.5 + 0.5) * crop
    tform = np.linalg.inv(tform_params).T
    moved = np.concatenate([points_2d, np.ones((len(points), 1))], axis=1) @ tform
    return np.stack([moved[:, 0] / out[1] * 2 - 1, moved[:, 1] / out[0] * 2 - 1], axis=1)


def test_crop_frame_moves_vertices_as_decas_render_orig():
    square = bbox2point(240.0, 360.0, 150.0, 290.0, "kpt68")
    frame = CropFrame(square.tform, 512, 512)
    rng = np.random.default_rng(1)
    screen = rng.uniform(-1, 1, size=(50, 2))
    ours = screen @ frame.screen_transform()[:2, :2].T + frame.screen_transform()[:2, 2]
    np.testing.assert_allclose(ours, _official_transform_points(screen, square.tform), atol=1e-10)


def test_frontal_head_lands_where_the_reference_face_is():
    """The reference's own pose and camera drawn into its 512² frame covers, within a pixel, the photo region
    that the crop-frame render covers in the crop (mapped back through tform⁻¹, pixel centres as DECA's)."""
    renderer = HeadConditionRenderer.synthetic(device="cpu")
    code = neutral_identity_code()
    code["cam"] = np.array([7.0, 0.03, -0.05])
    own = {"pose": code["pose"], "exp": code["exp"], "cam": code["cam"], "light": code["light"]}
    square = bbox2point(250.0, 380.0, 140.0, 300.0, "kpt68")
    in_crop = renderer.render(code, own, "all", 224)
    in_photo = renderer.render(code, own, "all", 512, frame=CropFrame(square.tform, 512, 512))

    def box(mask):
        ys, xs = np.nonzero(mask[0] > 0)
        return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)

    inverse = np.linalg.inv(square.tform)
    corners = box(in_crop.mask) + 0.5  # pixel index i ↔ continuous coordinate i + 0.5
    mapped = [(inverse @ [corners[i], corners[j], 1.0])[:2] for i, j in ((0, 1), (2, 3))]
    expected = np.concatenate(mapped) - 0.5
    np.testing.assert_allclose(box(in_photo.mask), expected, atol=1.0)
    np.testing.assert_allclose(in_photo.target["cam"], code["cam"])
    # the frame enters the cache key: a render made in another frame is never reused
    assert in_photo.key != renderer.cache_key(code, own, "all", 512)


def test_template_faces_are_drawn_and_a_foreign_template_is_refused(tmp_path):
    from caphuman_bench.render.synthetic import write_synthetic_flame

    flame, texture, template = write_synthetic_flame(tmp_path)
    lines = template.read_text().splitlines()
    face_lines = [i for i, line in enumerate(lines) if line.startswith("f ")]
    # reverse the obj's face order: DECA draws the obj's own faces, so the renderer must follow it
    reordered = lines[: face_lines[0]] + [lines[i] for i in reversed(face_lines)]
    template.write_text("\n".join(reordered) + "\n")
    renderer = HeadConditionRenderer.from_files(flame, texture, template, device="cpu")
    obj_faces = np.array([[int(p.split("/")[0]) - 1 for p in lines[i].split()[1:]] for i in reversed(face_lines)])
    np.testing.assert_array_equal(renderer.mesh_renderer.faces.numpy(), obj_faces)
    # one vertex too many: not this FLAME topology, both files named
    template.write_text("v 0 0 0\n" + template.read_text())
    with pytest.raises(BenchError, match=rf"{template.name}.*vertices but .*{flame.name}"):
        HeadConditionRenderer.from_files(flame, texture, template, device="cpu")


def test_fan_heatmap_decoding_follows_face_alignment():
    """get_preds_fromhm: arg-max, a quarter pixel towards the larger neighbour, −0.5, inverse crop transform,
    truncated to int; FAN's box → centre moved up 0.12 · h, scale (w + h) / 195."""
    box = (100.0, 120.0, 300.0, 340.0)
    centre, scale = fan_crop_frame(box)
    np.testing.assert_allclose(centre, [200.0, 230.0 - 0.12 * 220.0])
    assert scale == pytest.approx(420.0 / 195.0)
    heatmaps = np.zeros((68, 64, 64), dtype=np.float32)
    heatmaps[:, 20, 30] = 1.0
    heatmaps[:, 20, 31] = 0.5  # right neighbour larger: +0.25 in x
    heatmaps[:, 19, 30] = 0.5  # upper neighbour larger: −0.25 in y
    points = heatmap_points(heatmaps, centre, scale)
    x, y = 31 + 0.25 - 0.5, 21 - 0.25 - 0.5
    h = 200.0 * scale
    t = np.array([[64 / h, 0, 64 * (-centre[0] / h + 0.5)], [0, 64 / h, 64 * (-centre[1] / h + 0.5)], [0, 0, 1]])
    expected = (np.linalg.pinv(t) @ [x, y, 1.0])[:2].astype(np.int32)
    np.testing.assert_array_equal(points, np.tile(expected, (68, 1)))


def test_fan_torchscript_runs_through_the_detector(tmp_path):
    """A TorchScript stand-in for 2DFAN-4 (same interface: [1, 3, 256, 256] → [1, 68, 64, 64]) loads and decodes."""

    class PeakNet(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 68, 64, 64)
            out[:, :, 32, 32] = x.mean()
            return out

    path = tmp_path / "2DFAN4-cd938726ad.zip"
    torch.jit.save(torch.jit.script(PeakNet()), str(path))
    detector = LandmarkDetector.create(path)
    assert detector.source == "fan"
    points = detector(Image.fromarray(data.astronaut()))
    assert points.shape == (68, 2) and np.all(points > 0)
    with pytest.raises(BenchError, match="TorchScript"):
        LandmarkDetector.create(tmp_path / "missing.zip")


def test_dlib_stand_in_gives_68_points_on_the_face():
    photo = resize_as_testdata(Image.fromarray(data.astronaut()), 512)
    points = dlib_landmarks([photo])[0]
    assert points.shape == (68, 2)
    assert LandmarkDetector.create(None).source == "dlib"
    # the astronaut's face lies around x 180-270, y 90-180 (MTCNN's box on the same photo)
    assert 160 < points[:, 0].mean() < 280 and 90 < points[:, 1].mean() < 190
    assert dlib_landmarks([Image.new("RGB", (200, 200), "white")]) == [None]


def test_largest_face_choice_and_full_size_detection():
    detection = FaceDetection(boxes=np.array([[0, 0, 10, 10], [0, 0, 40, 30.0]]), probs=np.array([0.99, 0.9]),
                              all_landmarks=np.zeros((2, 5, 2)))
    assert detection.choose("most_confident").prob == 0.99
    largest = detection.choose("largest")
    assert largest.prob == 0.9 and largest.box.tolist() == [0, 0, 40, 30]
    big = Image.new("RGB", (2560, 100))
    assert _detection_input(big, None) == (big, 1.0)  # fastcomposer: MTCNN sees every pixel
    small, factor = _detection_input(big, 2048)
    assert small.width == 2048 and factor == pytest.approx(1.25)


def test_detection_memo_hit_does_not_resize(monkeypatch):
    """Five families ask for each image's faces: after the first, a large photo is looked up, not resized."""
    from caphuman_bench.faces.detection import detect_faces

    big = Image.fromarray(data.astronaut()).resize((2600, 2600))
    first = detect_faces([big], max_side=2048)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized on a memo hit"))
    assert detect_faces([big], max_side=2048)[0] is first[0] is not None


class _Host:
    """The smallest adapter the head-render mixin needs: params, context, renderer, a (random) DECA reconstructor."""


@pytest.fixture(scope="module")
def random_deca():
    from caphuman_bench.models.deca_encoder import DecaEncoder

    torch.manual_seed(0)
    return DecaEncoder().eval()


def _host(random_deca, tmp_path, **params):
    from caphuman_bench.methods.base import MethodContext
    from caphuman_bench.methods.head_renders import HeadRenderMixin
    from caphuman_bench.models.deca_encoder import DecaReconstructor

    host = type("Host", (HeadRenderMixin, _Host), {})()
    host.params = {"height": 64, **params}
    host.context = MethodContext(device="cpu", workdir=tmp_path)
    host.renderer = HeadConditionRenderer.synthetic(device="cpu")
    host.reconstructor, host._codes = DecaReconstructor(random_deca, "deca:random"), {}
    return host


@pytest.mark.slow
def test_reference_code_and_frame_are_the_official_inputs(random_deca, tmp_path):
    """Default: 64² TestData resize, kpt68 square of dlib's landmarks (no FAN file here), DECA on that crop; the
    head keeps the reference's camera and is drawn in the reference's frame with the condition's rotation."""
    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.models.deca_encoder import deca_crop_square, encode_crops

    bench = Benchmark.load()
    reference, condition = bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"]
    host = _host(random_deca, tmp_path)
    code, frame = host.photo_code("nasa-astronaut", reference)
    resized = resize_as_testdata(reference, 64)
    square = landmark_square(dlib_landmarks([resized])[0])
    (expected,) = encode_crops(random_deca, deca_crop_square(resized, square)[None])
    np.testing.assert_allclose(code["shape"], expected["shape"], atol=1e-6)
    np.testing.assert_allclose(frame.tform, square.tform)
    assert (frame.width, frame.height) == (64, 64)

    render = host.head_render("nasa-astronaut", reference, condition, 64)
    np.testing.assert_allclose(render.target["cam"], code["cam"])
    np.testing.assert_allclose(render.target["pose"][:3], condition.pose[:3])
    direct = host.renderer.render(code, {**condition.coefficients(), "cam": code["cam"]}, "position,pose", 64, frame)
    np.testing.assert_array_equal(render.normal, direct.normal)
    # cached on disk: a fresh host reads the same code and frame
    again_code, again_frame = _host(random_deca, tmp_path).photo_code("nasa-astronaut", reference)
    np.testing.assert_array_equal(again_code["cam"], code["cam"]) and np.testing.assert_array_equal(again_frame.tform, frame.tform)


@pytest.mark.slow
def test_explicit_camera_mtcnn_crop_and_pose_image(random_deca, tmp_path):
    import dataclasses

    from caphuman_bench.benchmark import Benchmark
    from caphuman_bench.faces.detection import detect_faces

    bench = Benchmark.load()
    reference, condition = bench.reference_image("nasa-astronaut"), bench.conditions["yaw-r20"]
    crop_frame = _host(random_deca, tmp_path / "a", head_frame="crop")
    assert crop_frame.head_render("nasa-astronaut", reference, condition, 64).target["cam"].tolist() == condition.cam.tolist()

    mtcnn = _host(random_deca, tmp_path / "b", deca_crop="mtcnn")
    _, frame = mtcnn.photo_code("nasa-astronaut", reference)
    (found,) = detect_faces([resize_as_testdata(reference, 64)])
    np.testing.assert_allclose(frame.tform, bbox2point(found.box[0], found.box[2], found.box[1], found.box[3], "bbox").tform)

    pose_path = tmp_path / "pose.png"
    bench.reference_image("grace-hopper").save(pose_path)
    posed = dataclasses.replace(condition, pose_image=str(pose_path))
    host = _host(random_deca, tmp_path / "c")
    pose_code, pose_frame = host.photo_code(f"pose-{posed.id}", bench.reference_image("grace-hopper"))
    target = host.head_render("nasa-astronaut", reference, posed, 64).target
    np.testing.assert_allclose(target["pose"][:3], pose_code["pose"][:3])  # official position,pose from the pose photo
    np.testing.assert_allclose(target["cam"], pose_code["cam"])
    np.testing.assert_allclose(target["shape"], host.identity_code("nasa-astronaut", reference)["shape"])


def test_head_parameters_are_checked():
    from caphuman_bench.methods.head_renders import check_head_params, head_inputs

    with pytest.raises(BenchError, match="deca_crop"):
        check_head_params({"deca_crop": "fan"}, "card")
    with pytest.raises(BenchError, match="head_frame"):
        check_head_params({"head_frame": "photo"}, "card")
    recorded = head_inputs({})
    assert recorded["deca_crop"] == "kpt68" and recorded["head_frame"] == "reference"
    assert recorded["landmarks"].startswith("dlib")  # no FAN file on this machine


def test_pose_image_resolves_beside_the_spec_and_a_missing_one_is_named(tmp_path):
    import shutil

    import yaml

    from caphuman_bench.benchmark import Benchmark

    spec = tmp_path / "spec"
    shutil.copytree(Benchmark.load().root, spec)
    conditions = yaml.safe_load((spec / "head_conditions.yaml").read_text())
    conditions["conditions"][0]["pose_image"] = "poses/frontal.png"
    (spec / "head_conditions.yaml").write_text(yaml.safe_dump(conditions))
    with pytest.raises(BenchError, match=r"field 'pose_image': file .*poses/frontal.png not found"):
        Benchmark.load(spec)
    (spec / "poses").mkdir()
    Image.new("RGB", (32, 32)).save(spec / "poses" / "frontal.png")
    first = Benchmark.load(spec).conditions[conditions["conditions"][0]["id"]]
    assert first.pose_image == str((spec / "poses" / "frontal.png").resolve())

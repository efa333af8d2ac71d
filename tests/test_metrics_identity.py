"""Face detection and identity metrics on real public-domain photos with the shipped MTCNN and dlib weights.

Photos: scikit-image's `astronaut` (Eileen Collins, NASA) and matplotlib's `grace_hopper.jpg` (US Navy).
FaceNet is exercised with random InceptionResnetV1 weights saved to a file (the VGGFace2 file cannot
be downloaded here); ArcFace's alignment is tested geometrically (onnxruntime is not installed here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from caphuman_bench import weights
from caphuman_bench.errors import BenchError
from caphuman_bench.faces.arcface import ARCFACE_SIZE, ARCFACE_TEMPLATE, arcface_align
from caphuman_bench.faces.detection import aligned_crops_160, detect_faces
from caphuman_bench.metrics.base import ScoreContext, ScoreItem
from caphuman_bench.metrics.face_detection import FaceDetectionRate
from caphuman_bench.metrics.identity import (
    ArcFaceIdentity,
    DlibIdentity,
    FaceNetIdentity,
    facenet_on,
)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return Image.open(fh).convert("RGB")


@pytest.fixture(scope="module")
def face_weights():
    return weights.require(["mtcnn", "dlib_shape_predictor_5", "dlib_face_recognition"])


def item(image, reference, task="t", identity="astronaut", error=None) -> ScoreItem:
    return ScoreItem(task_id=task, identity_id=identity, prompt_id="p", condition_id="c", sample=0, image=image,
                     reference=reference, prompt="a photo of a person", image_error=error)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def test_dlib_reference_scores_itself_highest(astronaut, hopper, face_weights, tmp_path):
    """Done-when of issue 3: the reference scores ≥ 0.99 against itself; a mirror image and another
    person score measurably lower. Numbers: MTCNN box + dlib 5-point (the issue's 0.887 / 0.990 were
    measured with dlib's HOG detector and 68-point predictor)."""
    metric = DlibIdentity(ScoreContext(weights=face_weights, cache_dir=tmp_path))
    metric.update([item(astronaut, astronaut, "self"), item(ImageOps.mirror(astronaut), astronaut, "mirror"),
                   item(hopper, astronaut, "hopper")])
    same, mirror, other = (row.values for row in metric.last_rows)
    assert all(row.status == "ok" for row in metric.last_rows)
    assert same["id_sim_dlib"] >= 0.99 and same["id_dist_dlib"] < 1e-6 and same["id_match_dlib"] == 1.0
    assert mirror["id_sim_dlib"] == pytest.approx(0.991, abs=0.003)
    assert mirror["id_dist_dlib"] == pytest.approx(0.192, abs=0.02) and mirror["id_match_dlib"] == 1.0
    assert other["id_sim_dlib"] == pytest.approx(0.892, abs=0.01)
    assert other["id_dist_dlib"] == pytest.approx(0.667, abs=0.03) and other["id_match_dlib"] == 0.0
    assert same["id_sim_dlib"] - mirror["id_sim_dlib"] > 0.005 and mirror["id_sim_dlib"] - other["id_sim_dlib"] > 0.05
    # the reference embedding was computed once and cached under the run
    (cache_file,) = (tmp_path / "id_sim_dlib").glob("astronaut.*.npy")  # keyed by photo and weights
    cached = np.load(cache_file)
    assert cached.shape == (128,)


def test_face_detection_rate(astronaut, hopper, face_weights):
    metric = FaceDetectionRate(ScoreContext(weights=face_weights))
    metric.update([item(astronaut, astronaut), item(hopper, astronaut), item(Image.new("RGB", (256, 256), "gray"), astronaut)])
    values = [row.values["face_detection"] for row in metric.last_rows]
    assert values == [1.0, 1.0, 0.0]
    assert [row.extra["n_faces"] for row in metric.last_rows] == [1, 1, 0]
    assert metric.last_rows[0].extra["prob"] > 0.99
    assert metric.compute()["face_detection"]["mean"] == pytest.approx(2 / 3)


def test_no_face_policy_zero_and_skip(astronaut, face_weights):
    blank = Image.new("RGB", (256, 256), "gray")
    results = {}
    for policy in ("zero", "skip"):
        metric = DlibIdentity(ScoreContext(weights=face_weights, options={"no_face": policy}))
        metric.update([item(astronaut, astronaut, "a"), item(blank, astronaut, "b")])
        results[policy] = (metric.last_rows[1], metric.compute())
    zero_row, zero_agg = results["zero"]
    skip_row, skip_agg = results["skip"]
    assert zero_row.status == skip_row.status == "no_face"
    assert zero_row.values["id_sim_dlib"] == 0.0 and zero_row.values["id_match_dlib"] == 0.0
    assert math.isnan(zero_row.values["id_dist_dlib"])
    assert all(math.isnan(v) for v in skip_row.values.values())
    assert zero_agg["id_sim_dlib"]["n"] == 2 and zero_agg["id_sim_dlib"]["mean"] == pytest.approx(0.5, abs=1e-6)
    assert skip_agg["id_sim_dlib"]["n"] == 1 and skip_agg["id_sim_dlib"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert "zero" in DlibIdentity.convention["no_face"] and "skip" in DlibIdentity.convention["no_face"]
    with pytest.raises(BenchError, match="no_face"):
        DlibIdentity(ScoreContext(weights=face_weights, options={"no_face": "ignore"}))


def test_reference_without_face_is_not_scored(astronaut, face_weights):
    metric = DlibIdentity(ScoreContext(weights=face_weights))
    metric.update([item(astronaut, Image.new("RGB", (128, 128), "white"), identity="faceless")])
    row = metric.last_rows[0]
    assert row.status == "error" and "reference photo of identity 'faceless'" in row.reason
    assert all(math.isnan(v) for v in row.values.values())


@pytest.mark.parametrize("protocol", ["caphuman-bench", "fastcomposer"])
def test_several_faces_uses_the_protocols_face(astronaut, hopper, face_weights, protocol):
    """caphuman-bench: the most confident face; fastcomposer: the largest box (MTCNN keep_all, select_largest)."""
    pair = side_by_side(astronaut, hopper)
    (found,) = detect_faces([pair])
    assert found.n_faces >= 2
    assert found.prob == max(found.probs)
    if protocol == "fastcomposer":
        found = found.choose("largest")
        areas = (found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])
        assert areas[0] == areas.max()
    chosen_is_astronaut = found.box[2] <= astronaut.width
    metric = DlibIdentity(ScoreContext(weights=face_weights, options={"protocol": protocol}))
    metric.update([item(pair, astronaut)])
    row = metric.last_rows[0]
    assert row.extra["n_faces"] == found.n_faces
    expected = 0.99 if chosen_is_astronaut else 0.892
    assert row.values["id_sim_dlib"] == pytest.approx(expected, abs=0.012)


def test_aligned_crops_equal_facenet_mtcnn_output(astronaut, hopper):
    from facenet_pytorch import MTCNN

    reference = MTCNN(image_size=160, margin=0, select_largest=False)
    images = [astronaut, hopper, side_by_side(astronaut, hopper)]
    crops = aligned_crops_160(images, detect_faces(images))
    for image, crop in zip(images, crops):
        assert torch.equal(crop, reference(image))


@pytest.fixture(scope="module")
def random_facenet_file(tmp_path_factory):
    """Random InceptionResnetV1 weights in the layout of the VGGFace2 file (with its 8631-way logits)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    model = InceptionResnetV1(pretrained=None, classify=True, num_classes=8631)
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(model.state_dict(), path)
    return path


def test_facenet_loads_from_path_and_scores(astronaut, hopper, face_weights, random_facenet_file):
    context = ScoreContext(weights={**face_weights, "facenet_vggface2": random_facenet_file})
    metric = FaceNetIdentity(context)
    metric.update([item(astronaut, astronaut, "a"), item(hopper, astronaut, "b"), item(Image.new("RGB", (64, 64)), astronaut, "c")])
    same, other, blank = metric.last_rows
    assert same.values["id_sim_facenet"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= other.values["id_sim_facenet"] < same.values["id_sim_facenet"]
    assert blank.status == "no_face" and blank.values["id_sim_facenet"] == 0.0
    model = facenet_on(random_facenet_file, "cpu")
    (crop,) = aligned_crops_160([astronaut], detect_faces([astronaut]))
    with torch.no_grad():
        embedding = model(crop[None])
    assert embedding.shape == (1, 512) and float(embedding.norm()) == pytest.approx(1.0, abs=1e-5)


def test_facenet_refuses_a_foreign_state_dict(tmp_path):
    path = tmp_path / "not_facenet.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(BenchError, match=r"not_facenet\.pt.*missing key"):
        facenet_on(path, "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="garbage.pt: cannot read"):
        facenet_on(garbage, "cpu")


def test_arcface_alignment_puts_landmarks_on_the_template():
    """Dots drawn at landmarks that are the template under a known similarity (×2.5, 20°, shifted) land
    on the template after alignment; onnxruntime (the recogniser itself) is not needed for this."""
    angle = np.deg2rad(20)
    rotation = 2.5 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE @ rotation.T + np.array([120.0, 60.0])
    canvas = Image.new("RGB", (420, 420), "black")
    draw = ImageDraw.Draw(canvas)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(landmarks, colours):
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    aligned = arcface_align(canvas, landmarks)
    assert aligned.shape == (ARCFACE_SIZE, ARCFACE_SIZE, 3) and aligned.dtype == np.uint8
    for (x, y), colour in zip(ARCFACE_TEMPLATE, colours):
        mask = np.all(aligned == np.array(colour, dtype=np.uint8), axis=-1)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert abs(xs.mean() - x) < 0.75 and abs(ys.mean() - y) < 0.75


def test_arcface_without_onnxruntime_says_how_to_install(astronaut, face_weights, tmp_path):
    try:
        import onnxruntime  # noqa: F401

        pytest.skip("onnxruntime is installed; this checks the message shown without it")
    except ImportError:
        pass
    fake = tmp_path / "glintr100.onnx"
    fake.write_bytes(b"")
    metric = ArcFaceIdentity(ScoreContext(weights={**face_weights, "arcface_antelopev2": fake}))
    with pytest.raises(BenchError, match=r"onnxruntime.*caphuman-bench\[arcface\]"):
        metric.update([item(astronaut, astronaut)])


def test_arcface_session_matches_the_same_network_in_torch(astronaut, hopper, face_weights, tmp_path):
    """The onnxruntime path (input layout, (x - 127.5) / 127.5, batching) against the same tiny network
    run in torch on our own aligned crops. Runs where onnxruntime and onnx (for the export) are installed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from caphuman_bench.metrics.identity import cosine

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 16)).eval()
    path = tmp_path / "glintr100.onnx"
    torch.onnx.export(network, torch.zeros(1, 3, ARCFACE_SIZE, ARCFACE_SIZE), str(path), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}}, dynamo=False)
    metric = ArcFaceIdentity(ScoreContext(weights={**face_weights, "arcface_antelopev2": path}, options={"protocol": "caphuman-bench"}))
    metric.update([item(astronaut, astronaut, "a"), item(hopper, astronaut, "b")])
    same, other = (row.values["id_sim_arcface"] for row in metric.last_rows)
    # FastComposer's protocol scores max(cos, 0): the same negative cosine becomes 0, the rest is unchanged.
    clamped = ArcFaceIdentity(ScoreContext(weights={**face_weights, "arcface_antelopev2": path}, options={"protocol": "fastcomposer"}))
    clamped.update([item(astronaut, astronaut, "a"), item(hopper, astronaut, "b")])
    assert [row.values["id_sim_arcface"] for row in clamped.last_rows] == [same, max(other, 0.0)]

    def embed(image):
        (found,) = detect_faces([image])
        crop = torch.from_numpy(arcface_align(image, found.landmarks)).float().permute(2, 0, 1)[None]
        with torch.no_grad():
            return network((crop - 127.5) / 127.5)[0].numpy().astype(np.float64)

    assert same == pytest.approx(1.0, abs=1e-6)
    assert other == pytest.approx(cosine(embed(astronaut), embed(hopper)), abs=1e-5)
    assert other < 0  # the case the protocols tell apart

"""`data prepare` on a miniature CelebA laid out like the real one (annotation files + images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from caphuman_bench.benchmark import Benchmark
from caphuman_bench.data_prepare import prepare, select_celeba_identities
from caphuman_bench.errors import BenchError


@pytest.fixture
def mini_celeba(tmp_path):
    root = tmp_path / "celeba"
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    partition, identity, attrs = [], [], ["8", "Male Smiling"]
    rng = np.random.default_rng(0)
    n = 0
    for ident in range(1, 13):
        for k in range(7):
            n += 1
            name = f"{n:06d}.jpg"
            part = 2 if (k >= 1 and ident != 5) else 0  # identity 5 has no test photos
            partition.append(f"{name} {part}")
            identity.append(f"{name} {ident}")
            attrs.append(f"{name} {1 if ident % 2 else -1} 1")
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / name)
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    (root / "identity_CelebA.txt").write_text("\n".join(identity) + "\n")
    (root / "list_attr_celeba.txt").write_text("\n".join(attrs) + "\n")
    return root


def test_selection_rule_is_deterministic_and_documented(mini_celeba):
    chosen = select_celeba_identities(mini_celeba, count=4)
    assert [i.id for i in chosen] == ["celeba-00001", "celeba-00004", "celeba-00009", "celeba-00012"]
    assert chosen[0].files[0] == "000002.jpg"  # smallest test-partition file of identity 1: its reference
    assert list(chosen[0].files) == sorted(chosen[0].files) and len(chosen[0].files) == 5  # the references split's photos
    assert chosen[0].subject == "a man" and chosen[1].subject == "a woman"
    with pytest.raises(BenchError, match="only 11 test identities"):
        select_celeba_identities(mini_celeba, count=20)


def test_prepare_writes_a_spec_that_runs_and_reports_missing_files(mini_celeba, tmp_path):
    out = tmp_path / "prepared"
    report = prepare(out, celeba_root=mini_celeba, count=4)
    assert not report.missing and len(report.written) == 4
    bench = Benchmark.load(out, identities_dir=out / "identities")
    celeba = [i for i in bench.identities.values() if i.source == "celeba" and not i.of]  # rows, not "<id>@k"
    assert len(celeba) == 4 and all(len(d) == 64 for i in celeba for d in i.sha256.split(";"))
    assert len(bench.split("identity").identities) == 4
    assert bench.reference_image("celeba-00004").size == (64, 64)
    assert len(bench.reference_images("celeba-00004@5")) == 5  # photos 2-5 copied as <id>.<n>.jpg
    assert (out / "identities" / "celeba-00004.5.jpg").exists()

    # A second preparation verifies the listed sha256 and names a file that went missing.
    (mini_celeba / "img_align_celeba" / celeba[1].files[0]).unlink()
    again = prepare(tmp_path / "again", celeba_root=mini_celeba, spec_root=out)
    assert len(again.missing) == 1 and celeba[1].files[0] in again.missing[0]


def test_prepare_from_a_folder_of_faces(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("alice", "bob"):
        Image.new("RGB", (64, 64), (200, 150, 120)).save(faces / f"{name}.jpg")
    report = prepare(tmp_path / "out", identities_dir=faces)
    assert sorted(report.written) == ["alice", "bob"]
    with pytest.raises(BenchError, match="exactly one of"):
        prepare(tmp_path / "x")


def test_a_prepared_folder_of_faces_fills_the_benchmark_splits(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("alice", "bob"):
        Image.new("RGB", (64, 64), (200, 150, 120)).save(faces / f"{name}.jpg")
    out = tmp_path / "out"
    prepare(out, identities_dir=faces)
    bench = Benchmark.load(out, identities_dir=out / "identities")
    assert bench.split("full").identities == ("alice", "bob")
    assert bench.split("prompt").identities == ("alice", "bob")  # prepared:10 takes what there is

    Image.new("RGB", (64, 64), (10, 20, 30)).save(out / "identities" / "bob.jpg")  # replaced after preparing
    fresh = Benchmark.load(out, identities_dir=out / "identities")
    with pytest.raises(BenchError, match=r"bob.*sha256"):
        fresh.reference_image("bob")

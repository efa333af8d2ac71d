"""`caphuman-bench data prepare`: turn CelebA (or any folder of faces) into a prepared benchmark.

CelebA is not shipped. The paper's 100 identities are unreleased, so they are selected by a fixed,
documented rule from CelebA's test partition (see `select_celeba_identities`). The prepared folder
is a copy of the spec whose `identities.csv` lists the selected photos with their sha256, plus
`identities/<identity>.jpg`; pass it as `--spec DIR --identities-dir DIR/identities`.
If the spec already lists CelebA rows (a published list), those are verified instead of selected.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from caphuman_bench.benchmark import DEFAULT_SPEC_DIR, Benchmark, Identity, identities_folder, photo_file_name
from caphuman_bench.errors import BenchError
from caphuman_bench.images import ImageError, load_rgb
from caphuman_bench.weights import sha256_of

SPEC_FILES = ("VERSION", "prompts.yaml", "head_conditions.yaml", "splits.yaml")
MIN_TEST_IMAGES = 5  # an identity needs this many test-partition photos to be eligible
IMAGE_FOLDERS = ("img_align_celeba", "Img/img_align_celeba", "img_align_celeba/img_align_celeba")


@dataclass
class PrepareReport:
    out_dir: Path
    written: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "file: reason"

    def summary(self) -> str:
        lines = [f"prepared {len(self.written)} identities in {self.out_dir}"]
        if self.missing:
            lines.append(f"{len(self.missing)} missing or invalid:")
            lines += [f"  {m}" for m in self.missing]
        else:
            lines.append(f"use it with: --spec {self.out_dir} --identities-dir {self.out_dir / 'identities'}")
        return "\n".join(lines)


def _read_table(path: Path, columns: int) -> list[list[str]]:
    if not path.exists():
        raise BenchError(f"{path}: CelebA annotation file missing")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) == columns:
            rows.append(parts)
        elif parts and n > 2:  # list_attr_celeba.txt has a count line and a header line
            raise BenchError(f"{path}: line {n} has {len(parts)} fields, expected {columns}")
    return rows


def select_celeba_identities(celeba_root: Path, count: int = 100) -> list[Identity]:
    """The selection rule, fixed so that anyone with CelebA gets the same list:

    1. photos of the test partition (`list_eval_partition.txt` value 2);
    2. identities (`identity_CelebA.txt`) with at least MIN_TEST_IMAGES such photos, sorted by number;
    3. `count` of them evenly spaced over that list (index round(i·(N−1)/(count−1)));
    4. each identity's reference photo is its test photo with the smallest file name; its first
       MIN_TEST_IMAGES test photos by file name are its reference photos for the `references` split;
    5. subject phrase from `list_attr_celeba.txt` (Male = 1 → "a man", else "a woman"), "a person"
       when that file is absent.
    """
    partition = {name: int(p) for name, p in _read_table(celeba_root / "list_eval_partition.txt", 2)}
    by_identity: dict[int, list[str]] = {}
    for name, ident in _read_table(celeba_root / "identity_CelebA.txt", 2):
        if partition.get(name) == 2:
            by_identity.setdefault(int(ident), []).append(name)
    eligible = sorted(i for i, files in by_identity.items() if len(files) >= MIN_TEST_IMAGES)
    if len(eligible) < count:
        raise BenchError(f"{celeba_root}: only {len(eligible)} test identities have {MIN_TEST_IMAGES}+ photos, {count} needed")
    picks = [eligible[round(i * (len(eligible) - 1) / max(count - 1, 1))] for i in range(count)]
    male = {}
    attr_path = celeba_root / "list_attr_celeba.txt"
    if attr_path.exists():
        lines = attr_path.read_text().splitlines()
        header = lines[1].split()
        column = header.index("Male") + 1
        for line in lines[2:]:
            parts = line.split()
            if len(parts) == len(header) + 1:
                male[parts[0]] = parts[column] == "1"
    identities = []
    for ident in picks:
        photos = sorted(by_identity[ident])[:MIN_TEST_IMAGES]
        subject = {True: "a man", False: "a woman"}.get(male.get(photos[0]), "a person")
        identities.append(Identity(f"celeba-{ident:05d}", subject, "celeba", ";".join(photos), "", "CelebA: non-commercial research only"))
    return identities


def _image_folder(celeba_root: Path) -> Path:
    for rel in IMAGE_FOLDERS:
        if (celeba_root / rel).is_dir():
            return celeba_root / rel
    raise BenchError(f"{celeba_root}: no image folder ({', '.join(IMAGE_FOLDERS)})")


def prepare(out_dir: Path, *, celeba_root: Path | None = None, identities_dir: Path | None = None,
            spec_root: Path | None = None, count: int = 100) -> PrepareReport:
    if (celeba_root is None) == (identities_dir is None):
        raise BenchError("data prepare needs exactly one of --celeba-root DIR or --identities-dir DIR")
    identities_dir = identities_folder(identities_dir)
    bench = Benchmark.load(spec_root or DEFAULT_SPEC_DIR)
    rows_of_spec = [i for i in bench.identities.values() if not i.of]  # not the "<id>@k" a references split makes
    kept = [i for i in rows_of_spec if i.source == "package"]
    listed = [i for i in rows_of_spec if i.source != "package"]
    if celeba_root is not None:
        folder = _image_folder(celeba_root)
        chosen = listed or select_celeba_identities(celeba_root, count)
        sources = {i.id: [folder / f for f in i.files] for i in chosen}
    else:
        chosen = listed or [Identity(p.stem, "a person", "folder", p.name, "", "user-provided")
                            for p in sorted(identities_dir.glob("*.jpg"))]
        if not chosen:
            raise BenchError(f"{identities_dir}: no <identity>.jpg files")
        sources = {i.id: [identities_dir / (f if i.source == "folder" else photo_file_name(i.id, n)) for n, f in enumerate(i.files)]
                   for i in chosen}

    report = PrepareReport(out_dir)
    (out_dir / "identities").mkdir(parents=True, exist_ok=True)
    rows = []
    for ident in chosen:
        expected = ident.sha256.split(";") if ident.sha256 else [""] * len(ident.files)
        digests = []
        for n, (src, known) in enumerate(zip(sources[ident.id], expected)):
            if not src.exists():
                report.missing.append(f"{src}: not found (identity {ident.id})")
                break
            digest = sha256_of(src)
            if known and digest != known:
                report.missing.append(f"{src}: sha256 {digest[:12]}… differs from identities.csv ({known[:12]}…)")
                break
            try:
                load_rgb(src)
            except ImageError as exc:
                report.missing.append(f"{src}: {exc}")
                break
            dst = out_dir / "identities" / photo_file_name(ident.id, n)
            if not dst.exists() or sha256_of(dst) != digest:
                shutil.copyfile(src, dst)
            digests.append(digest)
        else:
            rows.append(Identity(ident.id, ident.subject, ident.source, ident.file, ";".join(digests), ident.licence))
            report.written.append(ident.id)
    for name in SPEC_FILES:
        shutil.copyfile(bench.root / name, out_dir / name)
    buf = io.StringIO()
    buf.write("# Prepared by `caphuman-bench data prepare`; sha256 of each reference photo as verified.\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "subject", "source", "file", "sha256", "licence"])
    for i in kept + rows:
        writer.writerow([i.id, i.subject, i.source, i.file, i.sha256, i.licence])
    (out_dir / "identities.csv").write_text(buf.getvalue())
    return report

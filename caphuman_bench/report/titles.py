"""Reported values in words: the title a reader sees (what is measured, by what, in which unit), and
the column group of the paper's Table 1 it belongs to (identity / text / head control).

Ids stay the keys everywhere (files, JSON, `compare`); only pages and the LaTeX table show titles.
Units follow the metrics' conventions (`metrics/*.py`): cosines and rates are unitless in [0, 1]
(rates shown as such, not as %), angles in degrees, DECA coefficient RMSE in the coefficients' units.
"""

from __future__ import annotations

from caphuman_bench.registry import split_variant

GROUPS = ("identity", "text", "head control", "other")

# value id -> (title, group)
TITLES: dict[str, tuple[str, str]] = {
    "face_detection": ("Face detected (MTCNN rate)", "identity"),
    "id_sim_facenet": ("ID similarity (FaceNet cosine)", "identity"),
    "id_sim_facenet_mean_ref": ("ID similarity to mean reference (FaceNet cosine)", "identity"),
    "id_sim_arcface": ("ID similarity (ArcFace cosine)", "identity"),
    "id_sim_arcface_mean_ref": ("ID similarity to mean reference (ArcFace cosine)", "identity"),
    "id_sim_dlib": ("ID similarity (dlib cosine)", "identity"),
    "id_dist_dlib": ("ID distance (dlib Euclidean)", "identity"),
    "id_match_dlib": ("ID match (dlib, distance < 0.6, rate)", "identity"),
    "id_sim_dlib_mean_ref": ("ID similarity to mean reference (dlib cosine)", "identity"),
    "id_sim_curricularface": ("ID similarity (CurricularFace cosine)", "identity"),
    "id_sim_curricularface_mean_ref": ("ID similarity to mean reference (CurricularFace cosine)", "identity"),
    "clip_score": ("CLIP score (image–prompt cosine)", "text"),
    "prompt_acc_top1": ("Prompt accuracy (CLIP top-1 rate)", "text"),
    "prompt_acc_top5": ("Prompt accuracy (CLIP top-5 rate)", "text"),
    "rmse_shape": ("Shape RMSE (DECA coefficients)", "head control"),
    "rmse_pose": ("Pose RMSE (DECA coefficients, rad)", "head control"),
    "rmse_exp": ("Expression RMSE (DECA coefficients)", "head control"),
    "rmse_light": ("Lighting RMSE (DECA SH coefficients)", "head control"),
    "pose_error_deg": ("Pose error (DECA, degrees)", "head control"),
    "yaw_error_deg": ("Yaw error (DECA, degrees)", "head control"),
    "pitch_error_deg": ("Pitch error (DECA, degrees)", "head control"),
    "roll_error_deg": ("Roll error (DECA, degrees)", "head control"),
    "mp_pose_error_deg": ("Pose error (MediaPipe, degrees)", "head control"),
    "mp_yaw_error_deg": ("Yaw error (MediaPipe, degrees)", "head control"),
    "mp_pitch_error_deg": ("Pitch error (MediaPipe, degrees)", "head control"),
    "mp_roll_error_deg": ("Roll error (MediaPipe, degrees)", "head control"),
    "face_diversity": ("Face diversity (LPIPS between samples)", "other"),
}

# The value a leaderboard is sorted by: the paper's ID similarity, else the first recogniser scored.
SORT_BY = ("id_sim_facenet", "id_sim_arcface", "id_sim_curricularface", "id_sim_dlib", "clip_score")


def title(name: str, higher: bool | None = None) -> str:
    """'ID similarity (FaceNet cosine) ↑'; an unknown value (a plugin's) keeps its id. A value scored by
    another model names it where the title names DECA: 'Pose error (emoca_v2, degrees)'."""
    base, model = split_variant(name)
    words = TITLES.get(base, (name, "other"))[0]
    if model:
        words = words.replace("DECA", model) if "DECA" in words else f"{words} [{model}]"
    return words + ("" if higher is None else " ↑" if higher else " ↓")


def group(name: str) -> str:
    """The column group; a value scored by another model has its own ('head control · emoca_v2')."""
    base, model = split_variant(name)
    words = TITLES.get(base, (name, "other"))[1]
    return f"{words} · {model}" if model and base in TITLES else words


def grouped(names: list[str]) -> list[tuple[str, list[str]]]:
    """`names` in the paper's column groups, each followed by its other models' groups; in each, the
    detection rate, then the paper's ID similarity and the other recognisers (`SORT_BY`'s order), then
    the rest in the names' order; empty groups left out."""
    def key(name):
        return (name != "face_detection", SORT_BY.index(name) if name in SORT_BY else len(SORT_BY))

    present = {group(n) for n in names}
    order = [g for base in GROUPS for g in [base, *sorted(p for p in present if p.startswith(f"{base} · "))]]
    return [(g, sorted((n for n in names if group(n) == g), key=key)) for g in order if g in present]


def sort_value(results: list[dict]) -> str | None:
    """The value rows are ranked by: the first of `SORT_BY` that some run scored."""
    present = {n for res in results for n, m in res["metrics"].items() if m.get("mean") is not None}
    return next((n for n in SORT_BY if n in present), None)


def ranked(results: list[dict]) -> list[int]:
    """Run indices best first by `sort_value` (in its direction); unscored runs last, ties in input order."""
    name = sort_value(results)
    if name is None:
        return list(range(len(results)))

    def key(i):
        m = results[i]["metrics"].get(name) or {}
        mean = m.get("mean")
        return (1, 0.0) if mean is None else (0, -mean if m.get("higher_is_better", True) else mean)

    return sorted(range(len(results)), key=key)


def best_index(means: list[float | None], higher: bool | None) -> set[int]:
    """Indices holding the best mean of a column (all of them on a tie); none without a direction."""
    scored = [m for m in means if m is not None]
    if higher is None or not scored:
        return set()
    best = max(scored) if higher else min(scored)
    return {i for i, m in enumerate(means) if m == best}

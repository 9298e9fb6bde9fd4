"""scripts/collect_results.py (the last step of the README's first command): tables from the
summary.json files of a sweep, with the paper's numbers beside the paper's settings."""

import json
import subprocess
import sys

from hydra_configs import ROOT


def collect(*args):
    return subprocess.run(
        [sys.executable, "scripts/collect_results.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_summary(folder, **summary):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def classification(root, norm, batch, seed, error, data="fashion_mnist", model="small_resnet"):
    write_summary(
        root / f"{norm}-b{batch}-s{seed}",
        norm=norm,
        batch=batch,
        seed=seed,
        top1_error=error,
        images_per_second=100.0 + batch,
        config={"data": {"name": data}, "model": {"name": model}},
    )


def row(text, norm):
    return next(line for line in text.splitlines() if line.startswith(f"| {norm} |"))


def test_classification_table_averages_seeds_and_writes_table_and_plot(tmp_path):
    runs = tmp_path / "runs"
    classification(runs, "bn", 2, 0, 40.0)
    classification(runs, "bn", 2, 1, 43.0)
    classification(runs, "bn", 32, 0, 27.5)
    classification(runs, "mabn", 2, 0, 33.25)
    out, png = tmp_path / "results" / "table.md", tmp_path / "results" / "plot.png"
    result = collect(runs, "--out", out, "--plot", png, "--title", "A `quoted` title")
    assert result.returncode == 0, result.stderr
    assert row(result.stdout, "bn") == "| bn | 27.50 | 41.50 |"
    assert row(result.stdout, "mabn") == "| mabn | - | 33.25 |"
    assert "paper" not in result.stdout  # not the paper's setting: no paper numbers
    assert out.read_text().strip() == result.stdout.strip()
    assert "--title 'A `quoted` title'" in out.read_text()  # the command can be copied back
    assert png.read_bytes().startswith(b"\x89PNG")


def test_paper_imagenet_runs_show_the_paper_numbers(tmp_path):
    classification(tmp_path, "mabn", 2, 0, 24.0, data="imagenet", model="resnet50")
    result = collect(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(paper in brackets)" in result.stdout
    assert row(result.stdout, "mabn") == "| mabn | 24.00 (23.67) |"


APS = dict(box_AP=30.0, box_AP50=50.0, box_AP75=31.0, mask_AP=27.0, mask_AP50=47.0, mask_AP75=28.0)


def detection(folder, data="coco", backbone="resnet50"):
    config = {"data": {"name": data}, "detector": {"backbone": backbone}}
    write_summary(folder, norm="mabn", batch=2, start="scratch", config=config, **APS)


def test_detection_table_lists_ap_with_the_paper_numbers_at_the_papers_setting_only(tmp_path):
    detection(tmp_path / "paper" / "mabn")
    detection(tmp_path / "scenes" / "mabn", data="fashion_scenes", backbone="resnet18")
    result = collect(tmp_path / "paper")
    assert result.returncode == 0, result.stderr
    assert "| scratch | mabn | 2 | 30.00 | 50.00 | 31.00 | 27.00 | 47.00 | 28.00 | 36.5 / 32.69 |" in result.stdout
    result = collect(tmp_path / "scenes")  # a small R18 on generated scenes: not the paper's setting
    assert "| scratch | mabn | 2 | 30.00 | 50.00 | 31.00 | 27.00 | 47.00 | 28.00 | - |" in result.stdout


def test_a_folder_of_both_kinds_and_two_models_gives_a_table_for_each(tmp_path):
    classification(tmp_path, "bn", 2, 0, 14.0)
    classification(tmp_path / "vit", "bn", 2, 0, 20.0, model="vit_tiny")
    detection(tmp_path / "det" / "mabn", data="fashion_scenes", backbone="resnet18")
    result = collect(tmp_path)
    assert result.returncode == 0, result.stderr
    small, vit = result.stdout.split("Model small_resnet:")[1].split("Model vit_tiny:")
    assert row(small, "bn") == "| bn | 14.00 |" and row(vit, "bn") == "| bn | 20.00 |"
    assert "| scratch | mabn | 2 | 30.00 |" in vit  # the detection table after both


def test_no_runs_is_a_one_line_error(tmp_path):
    result = collect(tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: no summary.json under {tmp_path}: run a training job first"


def test_quick_runs_beside_the_study_cells_and_one_line_per_claim_on_their_cells(tmp_path):
    for norm, batch, error in (("bn", 32, 12.0), ("bn", 2, 14.5), ("mabn", 32, 12.3), ("mabn", 2, 11.1)):
        classification(tmp_path, norm, batch, 0, error)
    result = collect(tmp_path, "--study", ROOT / "results" / "REPORT.md")
    assert result.returncode == 0, result.stderr
    study = (ROOT / "results" / "fashion_study.md").read_text()
    bn32 = next(line for line in study.splitlines() if line.startswith("| bn |")).split(" | ")[1]
    assert f"| bn | 32 | 12.00 | {bn32} |" in result.stdout  # the study's mean ± half-width beside
    claims = [line for line in result.stdout.splitlines() if line.startswith("- ")]
    cells = {"bn@2 minus bn@32", "mabn@2 minus bn@32", "mabn@2 minus mabn@32", "bn@2 minus mabn@2"}
    assert {c for c in cells if any(c in line for line in claims)} == cells and len(claims) == len(cells)
    verdict = {c: line for line in claims for c in cells if c in line}
    assert verdict["bn@2 minus bn@32"].endswith("these runs agree.")  # +2.5 here, the study's interval above 0
    assert verdict["mabn@2 minus bn@32"].endswith("these runs agree.")  # -0.9 here, the study's below 0
    # -1.2 here, outside the study's interval around 0: the line says why and where the evidence is
    assert (
        "these runs disagree" in verdict["mabn@2 minus mabn@32"] and "(run length)" in verdict["mabn@2 minus mabn@32"]
    )


def test_runs_on_no_cell_of_the_study_say_so(tmp_path):
    classification(tmp_path, "frn", 2, 0, 15.0)
    result = collect(tmp_path, "--study", ROOT / "results" / "REPORT.md")
    assert result.returncode == 0, result.stderr
    assert "No claim of the study is on these cells." in result.stdout and "claims on these cells:" not in result.stdout

"""The README's snippet runs, CI runs the README's test command, and docs/gpu.md lists the GPU check's parts."""

import re
import subprocess

import pytest
import torch
from hydra_configs import ROOT
from readme import README, code_blocks

GPU_DOC = (ROOT / "docs" / "gpu.md").read_text()


def test_use_mabn_in_your_own_model_snippet_runs(capsys):
    (snippet,) = code_blocks("Use MABN in your own model", "python")
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([2, 10])"


def test_ci_runs_the_readme_test_command():
    setup_and_run, tests = code_blocks("Quick start", "bash")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
    assert setup_and_run.startswith("bash scripts/setup.sh && ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_gpu_check_refuses_without_cuda_in_one_line_and_its_parts_are_in_the_docs():
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout == "" and result.stderr.strip().count("\n") == 0 and "no CUDA device" in result.stderr
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    for part in re.findall(r"^part (\w+) (\d+)", script, flags=re.M):
        assert f"| {part[0]} |" in GPU_DOC, part


def test_docs_layers_page_shows_the_readme_snippet_and_the_readme_stays_an_entry_page():
    layers = (ROOT / "docs" / "layers.md").read_text()
    (snippet,) = code_blocks("Use MABN in your own model", "python")
    assert f"```python\n{snippet}```" in layers
    assert len(README.splitlines()) <= 200

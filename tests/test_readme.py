"""The README's snippet runs, and CI runs the README's test command."""

import re

from hydra_configs import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks(section: str, language: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def test_use_mabn_in_your_own_model_snippet_runs(capsys):
    (snippet,) = code_blocks("Use MABN in your own model", "python")
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([2, 10])"


def test_ci_runs_the_readme_test_command():
    setup_and_run, tests = code_blocks("Quick start", "bash")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
    assert setup_and_run.startswith("bash scripts/setup.sh && ")

"""The README's text and its fenced code blocks, for the tests that run what it shows."""

import re

from hydra_configs import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README's section ``## section``."""
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)

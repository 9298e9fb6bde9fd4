"""Every file of the project that the docs, the README, the configs and the reports cite exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITING = [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("results/*.md")]
# a path of the project's folders that ends in a file name with an extension
CITED = re.compile(r"(?<![\w/.:+-])((?:docs|results|configs|scripts|mabn|tests)/[\w./-]*\.(?:md|py|yaml|sh|png|json))")
# what a command writes (--out x.md), a file as it was at a commit (git show <commit>:path)
NOT_CITED = re.compile(r"(--out|--plot|\[--out|\[--plot)\s+$|git show \w+:$")
NEW_FILES_PAGE = ROOT / "docs" / "adding_a_norm.md"  # names the files a new norm would add


def test_every_cited_path_exists():
    missing = []
    for doc in CITING:
        if doc == NEW_FILES_PAGE:
            continue
        text = doc.read_text()
        for match in CITED.finditer(text):
            if NOT_CITED.search(text[max(0, match.start() - 40) : match.start()]):
                continue
            if not (ROOT / match.group(1)).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {match.group(1)}")
    assert not missing, missing


def test_a_missing_path_is_found():
    assert CITED.findall("see `results/nothing_here.md` and docs/layers.md.") == [
        "results/nothing_here.md",
        "docs/layers.md",
    ]
    assert NOT_CITED.search("python x.py --out ") and NOT_CITED.search("`git show fc40cd1:")

"""The library installs alone: the wheel, without extras, in a new virtual environment that holds
torch, torchvision, timm and what they need, and nothing of the suite's (Hydra, W&B, submitit,
pycocotools, matplotlib, scipy); the README's library example runs there.

Installing torch again would take minutes and gigabytes, so the new environment reuses this one's
copies: its site-packages gets links to exactly the distributions that torch, torchvision and timm
require (their dependency closure, read from their metadata), and pip installs the wheel with no
index, so a requirement outside that closure would fail the install."""

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hydra_configs import ROOT
from packaging.requirements import Requirement
from readme import code_blocks

LIBRARY = ("torch", "torchvision", "timm")
SUITE = ("hydra", "omegaconf", "wandb", "submitit", "pycocotools", "matplotlib", "scipy", "onnx", "mkdocs")


def closure(names) -> list[metadata.Distribution]:
    """The installed distributions that ``names`` require, recursively (with the extras asked of
    them), themselves included."""
    seen, asked, todo = {}, set(), [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        name = re.sub(r"[-_.]+", "-", name).lower()
        if (name, extra) in asked:
            continue
        asked.add((name, extra))
        dist = seen.setdefault(name, metadata.distribution(name))
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, wanted) for wanted in ("", *requirement.extras)]
    return list(seen.values())


def link_into(site: Path, dists) -> None:
    """Links in ``site`` to each distribution's top-level files and folders (its dist-info too)."""
    for dist in dists:
        for top in {Path(str(file)).parts[0] for file in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


def test_the_wheel_installs_without_extras_and_the_library_example_runs(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: nothing written in the clone
    shutil.copytree(ROOT / "mabn", source / "mabn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("mabn-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", venv], check=True)  # pip from Python's own bundled wheel
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    link_into(site, closure(LIBRARY))
    no_config = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")} | {
        "PIP_CONFIG_FILE": os.devnull
    }
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", wheel],
        capture_output=True,
        text=True,
        env=no_config,
    )
    assert install.returncode == 0, install.stderr

    (example,) = code_blocks("Use MABN in your own model", "python")
    check = f"""
import importlib.util, sys
import mabn, mabn.probes, mabn.wiring, mabn.convert, mabn.registry  # the library: layers, probe, wiring, conversion
absent = [name for name in {SUITE!r} if importlib.util.find_spec(name) is not None]
assert not absent, f"the new environment has the suite's packages: {{absent}}"
{example}
assert mabn.__file__.startswith({str(site)!r}), mabn.__file__
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({SUITE!r}))
print("suite modules loaded:", loaded)
"""
    result = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["torch.Size([2, 10])", "suite modules loaded: []"], result.stdout

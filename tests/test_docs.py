"""The documentation stands on its own: a clone has every page the code and README point to."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ROOT / "docs" / "algorithms.md"
# Pointers to a document outside the repository, which a clone does not have. Spelled in two
# pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("../" + "shared", "SPEC" + ".md", "SPEC" + " §")
SKIPPED_DIRS = {".git", ".venv", "runs", "__pycache__", "node_modules"}


def repository_files() -> list[Path]:
    """The tracked text files (git ls-files), or every file outside build and run outputs when
    the tree is not a git checkout (a source archive)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    else:
        paths = [p for p in ROOT.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and p.suffix not in (".png", ".jpg", ".safetensors", ".pt")]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(ref in line for ref in OUTSIDE_REFERENCES):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "point to docs/algorithms.md instead:\n" + "\n".join(offenders)


def test_the_readme_links_the_algorithms_page():
    assert ALGORITHMS.is_file()
    assert "](docs/algorithms.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_algorithms_page_cites_the_three_papers():
    text = ALGORITHMS.read_text(encoding="utf-8")
    for arxiv_id in ("2311.08105", "2501.18512", "2502.12996"):
        assert f"https://arxiv.org/abs/{arxiv_id}" in text


def test_every_link_into_the_algorithms_page_names_one_of_its_sections():
    text = ALGORITHMS.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
    links = re.compile(r"algorithms\.md#([\w\-]+)")
    broken = []
    for path in repository_files():
        for anchor in links.findall(path.read_text(encoding="utf-8", errors="replace")):
            if anchor not in anchors:
                broken.append(f"{path.relative_to(ROOT)}: #{anchor}")
    # The page's own table of contents links with a bare '#...'.
    broken += [f"docs/algorithms.md: #{a}" for a in re.findall(r"\]\(#([\w\-]+)\)", text) if a not in anchors]
    assert not broken, f"no such section in docs/algorithms.md (sections: {sorted(anchors)}):\n" + "\n".join(broken)


@pytest.mark.parametrize("heading,anchor", [("Eager updates", "eager-updates"),
                                            ("Outer gradient and outer optimizer",
                                             "outer-gradient-and-outer-optimizer")])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_plan_help_points_to_the_model(capsys):
    from fl_diloco.planner import main as plan_main

    assert plan_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "docs/algorithms.md#compute-utilization" in out and "fl_diloco/planner.py" in out


def test_every_config_key_has_help():
    from fl_diloco.config import RunConfig, key_help

    described = key_help()
    assert list(described) == RunConfig.keys(), "key_help() must list RunConfig's keys in field order"
    for key, (meaning, allowed) in described.items():
        assert meaning.strip() and allowed.strip(), f"{key}: empty help"


def test_train_help_lists_every_key_with_its_default(capsys):
    from fl_diloco.cli import main
    from fl_diloco.config import DEFAULTS, key_help

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Hydra" not in out  # our page, not Hydra's stock one
    for key, (meaning, allowed) in key_help().items():
        default = DEFAULTS[key]
        shown = str(default).lower() if isinstance(default, bool) else (default if default != "" else '""')
        assert f"  {key}={shown} " in out and f"allowed: {allowed}" in out, key
        assert " ".join(meaning.split()[:4]) in " ".join(out.split()), key

"""The README and the docs as an operator reads them: commands first, links and examples true.

The README starts with ``make demo`` and ``make test`` and warns beside them; its first
policy passes ``check``; every link and every repository path its commands name exists;
no page suggests a system-wide ``pip install``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
PAGES = [README, ROOT / "systemd" / "README.md", ROOT / "bench" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]  # fmt: skip
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)$")


def blocks(text: str) -> Iterator[tuple[str, str]]:
    """Each fenced block of ``text``: (its language, its content)."""
    language: str | None = None
    content: list[str] = []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and language is None:
            language, content = fence.group(1), []
        elif line == "```" and language is not None:
            yield language, "\n".join(content)
            language = None
        elif language is not None:
            content.append(line)


def prose(text: str) -> str:
    """``text`` without its fenced blocks (a ``# comment`` in one is no heading)."""
    kept: list[str] = []
    inside = False
    for line in text.splitlines():
        if FENCE.match(line) or (inside and line == "```"):
            inside = not inside
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of ``text`` (a repeated one gets -1, -2...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose(text).splitlines():
        heading = re.match(r"^#{1,6} (.+)$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of ``text``, up to the next ``## ``."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_starts_with_make_demo_and_make_test_and_the_warning_beside_them() -> None:
    text = README.read_text()
    before_first_section = text.split("\n## ", 1)[0]
    language, first = next(blocks(text))
    assert language == "sh"
    commands = [line.split("#")[0].strip() for line in first.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    assert first in before_first_section
    # The paragraph right after the two commands.
    warning = before_first_section.split("```", 2)[2].strip().split("\n\n")[0]
    assert warning.startswith("> **Not on a production host.**"), warning
    assert "libvirtd" in warning and "install" in warning


def test_every_link_points_to_a_file_or_heading_in_the_repository() -> None:
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_relative_to(ROOT), f"{page.name}: {target} is outside the repository"
            assert linked.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in anchors(linked.read_text()), f"{page.name}: no heading {target}"


def test_the_contents_list_every_section_of_the_readme() -> None:
    text = README.read_text()
    listed = set(re.findall(r"\]\(#([^)]+)\)", section(text, "Contents")))
    sections = {a for a in anchors("\n".join(re.findall(r"^## .+$", prose(text), re.M)))}
    assert sections - {"contents"} <= listed, sections - listed


def test_the_repository_paths_in_the_readmes_commands_exist() -> None:
    named = set()
    for page in (README, ROOT / "systemd" / "README.md"):
        for language, content in blocks(page.read_text()):
            if language == "sh":
                named |= set(re.findall(r"(?<![\w/.])((?:config|systemd|scripts|examples|docs)"
                                        r"/[\w./-]+)", content))  # fmt: skip
    assert "config/virt-reclaim.toml" in named
    missing = {path for path in named if not (ROOT / path).exists()}
    assert not missing, missing


def test_the_first_policy_of_the_readme_passes_check(tmp_path: Path) -> None:
    """The policy an operator copies first is valid, and the commands under it name it."""
    text = section(README.read_text(), "A first policy")
    [policy] = [content for language, content in blocks(text) if language == "toml"]
    name = tomllib.loads(policy)["policy"][0]["name"]
    config = tmp_path / "etc"
    (config / "policies.d").mkdir(parents=True)
    config.chmod(0o700)
    (config / "policies.d").chmod(0o700)
    path = config / "policies.d" / "10-first.toml"
    path.write_text(policy)
    path.chmod(0o600)
    if os.geteuid() != 0:  # check refuses files that are not root's
        os.chown(path, 0, 0)
    result = subprocess.run([sys.executable, "-m", "virt_reclaim", "check", "--config-dir",
                             str(config), "--connect", "test:///default"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert name in result.stdout
    assert "warning" not in result.stderr.lower(), result.stderr
    schema = json.loads(subprocess.run([sys.executable, "-m", "virt_reclaim", "schema"],
                                       capture_output=True, text=True, timeout=60,
                                       check=True).stdout)  # fmt: skip
    jsonschema.validate(tomllib.loads(policy), schema)
    commands = "\n".join(content for language, content in blocks(text) if language == "sh")
    assert set(re.findall(r"--policy (\S+)", commands)) == {name}


def test_no_page_suggests_a_system_wide_pip_install() -> None:
    for page in PAGES:
        for language, content in blocks(page.read_text()):
            for line in content.splitlines():
                if "pip install" in line and language in ("sh", ""):
                    assert re.search(r"(/opt/virt-reclaim|\.venv)/bin/pip install", line), line
        # Indented blocks (systemd/README.md) too.
        for line in page.read_text().splitlines():
            if line.startswith("    ") and "pip install" in line:
                assert re.search(r"(/opt/virt-reclaim|\.venv)/bin/pip install", line), line

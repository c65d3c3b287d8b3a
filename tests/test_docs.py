"""The documentation says what the code does: the generated settings page is current, the
README's quickstart is the command CI runs, and its links lead somewhere."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from kitegreen import Config
from kitegreen.config import docs

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_page_is_current() -> None:
    """docs/configuration.md is what the Config fields' metadata renders today."""
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == docs.render(), (
        f"docs/configuration.md is stale; regenerate it with: {docs.COMMAND}"
    )


def test_configuration_page_lists_every_setting() -> None:
    """Every Config field has a row on the settings page, under its own name."""
    page = docs.render()
    missing = [f.name for f in dataclasses.fields(Config) if f"| `{f.name}` |" not in page]
    assert missing == []


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_two_commands_and_the_second_is_ci() -> None:
    """The README's quickstart is two commands; the test one is what .ci/run runs."""
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_command = next(line for line in ci.splitlines() if "tox" in line and "venv" in line)
    assert commands[1] == ci_command.replace(" --quiet", "").strip()
    assert "examples/echo/service.py:server" in commands[0]


def test_readme_links_exist() -> None:
    """Every relative link in the README and docs/ names a file of the repository."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []

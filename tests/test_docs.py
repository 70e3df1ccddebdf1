"""The docs cannot drift from what they describe: the configuration reference against the server's own parser,
the README's settings, the Kubernetes resources it quotes, every relative link, and the README's length."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
from pathlib import Path

import pytest
import yaml

from service.config import ENV_PREFIX, Limits, SamplingDefaults, ServerConfig, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
ROW = re.compile(r"^\| `(--[a-z0-9-]+)` \| `([A-Z0-9_]+)` \| ([^|]*) \|", re.M)


def settings() -> dict[str, dataclasses.Field]:
    """Every config field by its flag."""
    found = {}
    for cls in (ServerConfig, SamplingDefaults, Limits):
        for f in dataclasses.fields(cls):
            if f.name not in ("defaults", "limits"):
                found["--" + f.name.replace("_", "-")] = f
    return found


def table(path: Path) -> list[tuple[str, str, str]]:
    return ROW.findall(path.read_text())


def shown_default(f: dataclasses.Field) -> str:
    """How a default starts in the table's default cell."""
    value = f.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def test_the_configuration_reference_lists_every_flag_once_with_its_variable_and_default():
    rows = table(ROOT / "docs" / "configuration.md")
    flags = [flag for flag, _, _ in rows]
    assert sorted(flags) == sorted(settings()), set(flags) ^ set(settings())
    assert len(flags) == len(set(flags))
    parser_flags = {option for action in build_parser()._actions if not isinstance(action, argparse._HelpAction)
                    for option in action.option_strings if not option.startswith("--no-")}
    assert set(flags) == parser_flags
    for flag, env, default in rows:
        f = settings()[flag]
        assert env == ENV_PREFIX + f.name.upper(), flag
        assert default.strip().startswith(shown_default(f)), (flag, default, shown_default(f))


def test_the_readme_settings_are_real_and_agree_with_the_reference():
    reference = {flag: (env, default) for flag, env, default in table(ROOT / "docs" / "configuration.md")}
    rows = table(ROOT / "README.md")
    assert rows, "the README has a table of essential settings"
    for flag, env, default in rows:
        assert reference[flag][0] == env and default.strip().startswith(shown_default(settings()[flag])), flag


def test_the_readme_guides_in_at_most_250_lines_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in DOCS:
        assert f"docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_deployment_page_quotes_the_manifests_resources():
    manifest = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    resources = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]
    quoted = re.search(r"```yaml\n(resources:\n.*?)```", (ROOT / "docs" / "deployment.md").read_text(), re.S)
    assert quoted and yaml.safe_load(quoted.group(1))["resources"] == resources

"""The documentation: the site builds strictly, and every policy it shows is one the gateway loads.

``mkdocs.yml`` sets ``strict: true`` and turns a broken link, a missing anchor and a page left
out of the nav into warnings, so each of them fails the build: the first test builds the real
site, the next ones show that each kind of mistake does fail it (a strict build that passed
on anything would prove nothing). Everything runs in-process, with MkDocs' own build function.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort

from gateway.policy import parse_policy
from gateway.yamlfile import FileError
from support.processes import ROOT

DOCS = ROOT / "docs"
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)

# The YAML blocks in docs/ that are not policies, by their first line: anything else must load
# as a policy, so a misspelt key in a documented policy fails here instead of in a reader's gateway.
NOT_POLICIES = {
    "# .github/workflows/policy.yml": "a GitHub Actions workflow (changing-policy.md)",
    "apiVersion: cert-manager.io/v1": "a cert-manager Certificate (deploy.md)",
    "# Envoy: the ext_authz filter (envoy-grpc.yaml)": "Envoy configuration (edges/envoy.md)",
    "# Envoy: routes on x-regiongate-upstream": "Envoy configuration (edges/envoy.md)",
    "# Envoy: the facts in the access log and a rate limit descriptor": "Envoy configuration (edges/envoy.md)",
}


class Warnings(logging.Handler):
    """The warnings MkDocs logs during one build, so a failure says what they were."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    handler = Warnings()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def build_site(config_file: Path, site_dir: Path) -> None:
    config = load_config(config_file=str(config_file), site_dir=str(site_dir))
    assert config.strict, "mkdocs.yml must say strict: true"
    build(config)


def copy_of_the_docs(tmp_path: Path) -> Path:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path / "mkdocs.yml"


def test_the_site_builds_strictly(tmp_path: Path, warnings: Warnings) -> None:
    build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert warnings.messages == []
    assert (tmp_path / "site" / "reference" / "metrics" / "index.html").is_file()
    assert (tmp_path / "site" / "dashboard.png").is_file()


@pytest.mark.parametrize(
    ("page", "text", "warning"),
    [
        ("policy.md", "[gone](no-such-page.md)", "no-such-page.md"),
        ("policy.md", "[gone](routing.md#no-such-section)", "no-such-section"),
        ("orphan.md", "# Not in the nav\n", "orphan.md"),
    ],
    ids=["broken-link", "broken-anchor", "page-not-in-nav"],
)
def test_a_mistake_fails_the_build(tmp_path: Path, warnings: Warnings, page: str, text: str, warning: str) -> None:
    config = copy_of_the_docs(tmp_path)
    with open(tmp_path / "docs" / page, "a") as f:
        f.write("\n" + text + "\n")
    with pytest.raises(Abort):
        build_site(config, tmp_path / "site")
    assert any(warning in m for m in warnings.messages), warnings.messages


def headings(page: Path) -> set[str]:
    """The anchors MkDocs (and GitHub, for these headings) gives a page's headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slugify(m.group(1), "-") for m in re.finditer(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_the_pages_outside_the_site_link_to_what_exists(name: str) -> None:
    """The site's own links are MkDocs' to check; these three are read on the repository's page."""
    text = (ROOT / name).read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / (path or name)
        assert target.exists(), (name, link)
        if anchor:
            assert anchor in headings(target), (name, link)


def test_the_readme_links_every_page() -> None:
    linked = {link.partition("#")[0] for link in re.findall(r"\]\((docs/[^)\s]+)\)", (ROOT / "README.md").read_text())}
    pages = {str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md")} - {"docs/index.md"}
    assert pages - linked == set()


def yaml_blocks() -> list[tuple[str, int, str]]:
    """Every ```yaml block in docs/: (page, line of its first line, text)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for m in YAML_BLOCK.finditer(text):
            found.append((str(page.relative_to(ROOT)), text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return found


def test_the_docs_show_policies_and_know_their_other_yaml() -> None:
    firsts = [block.splitlines()[0] for _, _, block in yaml_blocks()]
    assert sorted(f for f in firsts if f in NOT_POLICIES) == sorted(NOT_POLICIES)
    assert len(firsts) - len(NOT_POLICIES) >= 7


def load_snippet(page: str, line: int, block: str) -> None:
    """A snippet that shows part of a policy (``rules:`` alone) gets ``version: 1`` in front, as a file needs.

    ``parse_policy`` raises ``FileError`` with ``page:line: problem`` for anything it would refuse
    in a gateway (schema, ISO codes, CIDRs, unreachable rules, upstreams), databases aside."""
    whole = re.search(r"^version:", block, re.M) is not None
    # Blank lines in front keep the parser's line numbers those of the page.
    padding = "\n" * (line - 1) if whole else "\n" * (line - 2) + "version: 1\n"
    parse_policy(padding + block, page, None)


POLICY_BLOCKS = [b for b in yaml_blocks() if b[2].splitlines()[0] not in NOT_POLICIES]


@pytest.mark.parametrize(("page", "line", "block"), POLICY_BLOCKS, ids=[f"{p}:{n}" for p, n, _ in POLICY_BLOCKS])
def test_every_policy_snippet_parses(page: str, line: int, block: str) -> None:
    load_snippet(page, line, block)


def test_a_bad_snippet_is_reported_at_its_line_on_the_page() -> None:
    with pytest.raises(FileError, match=r"^docs/x\.md:41: rules\[0\]\.countries: 'UK'"):
        load_snippet("docs/x.md", 40, "rules:\n  - {name: a, countries: [UK], action: allow}\n")

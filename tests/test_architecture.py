"""docs/ARCHITECTURE.md's import arrows are the code's, both ways; the runtime stays torch-free;
every relative link of README.md and docs/*.md leads to a file and heading that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
OURS = ("models", "stbir_train", "stbir_export", "stbir_infer")
RUNTIME_FORBIDDEN = {"torch", "torchvision", "open_clip", "tqdm", "yaml", "onnx", "onnxsim",
                     "models", "stbir_train", "stbir_export"}


def _imported_names(src: Path) -> set[str]:
    """Every module a file imports (lazy imports inside functions included), as dotted names;
    ``from pkg import mod`` yields ``pkg.mod`` too, since ``mod`` may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"), str(src))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _arrows_in_code(package: str) -> set[str]:
    """First-party modules ``package`` imports: other packages by name, runtime modules as
    ``stbir_infer.X``."""
    found: set[str] = set()
    for src in (REPO / package).rglob("*.py"):
        for name in _imported_names(src):
            parts = name.split(".")
            if parts[0] not in OURS or parts[0] == package:
                continue
            if parts[0] == "stbir_infer":
                if len(parts) > 1 and (REPO / "stbir_infer" / f"{parts[1]}.py").exists() \
                        or len(parts) > 1 and (REPO / "stbir_infer" / parts[1]).is_dir():
                    found.add(f"stbir_infer.{parts[1]}")
                elif len(parts) == 1:
                    found.add("stbir_infer")
            else:
                found.add(parts[0])
    return found


def _arrows_in_doc() -> dict[str, set[str]]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- arrows: begin -->(.*?)<!-- arrows: end -->", text, re.S)
    assert block, "docs/ARCHITECTURE.md lost its arrows table"
    table: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("package", "") or set(cells[0]) <= {"-"}:
            continue
        table[cells[0]] = {x.strip() for x in cells[1].split(",")
                           if x.strip() and not x.strip().startswith("(")}
    return table


def test_the_doc_lists_every_package():
    assert set(_arrows_in_doc()) == set(OURS)


def test_imports_match_the_documented_arrows():
    doc = _arrows_in_doc()
    for package in OURS:
        code = _arrows_in_code(package)
        assert code - doc[package] == set(), f"{package} imports what the doc does not allow"
        assert doc[package] - code == set(), f"docs/ARCHITECTURE.md lists arrows {package} no longer has"


def test_no_runtime_module_imports_torch_or_training_code():
    sources = list((REPO / "stbir_infer").rglob("*.py"))
    assert len(sources) > 10
    for src in sources:
        for name in _imported_names(src):
            assert name.split(".")[0] not in RUNTIME_FORBIDDEN, f"{src.relative_to(REPO)} imports {name}"


def test_no_package_module_is_over_400_lines():
    for package in OURS:
        for src in (REPO / package).rglob("*.py"):
            n = len(src.read_text(encoding="utf-8").splitlines())
            assert n <= 400, f"{src.relative_to(REPO)} has {n} lines"


def test_code_cites_only_files_the_repository_has():
    cited = re.compile(r"\b((?:docs/)?[A-Z][A-Z_]+\.md|docs/[\w.-]+\.md)\b")
    for package in OURS + ("benchmarks", "tests", "scripts"):
        for src in (REPO / package).rglob("*.py"):
            for name in cited.findall(src.read_text(encoding="utf-8")):
                if name == "README.md" or (REPO / name).exists() or (REPO / "docs" / name).exists():
                    continue
                raise AssertionError(f"{src.relative_to(REPO)} cites {name}, which the repository lacks")


# GitHub's rendering: fenced code holds no links or headings; a heading's anchor is its text in
# lower case, punctuation dropped, spaces made hyphens, "-1", "-2" ... for repeats.
_FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n, anchor = 0, slug
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def _broken_links(page: Path, root: Path) -> list[str]:
    """Relative links of a markdown page whose file, or #heading, does not exist under root."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in _LINK.findall(text):
        if _SCHEME.match(target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = unquote(target).partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            broken.append(f"{page.name}: {target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def test_readme_and_docs_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = [b for page in pages for b in _broken_links(page, REPO)]
    assert broken == [], "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    root = tmp_path / "repo"
    (root / "pages").mkdir(parents=True)
    (root / "pages" / "a.md").write_text("# A page\n\n## What `make demo` does\n\n## Repeat\n\n## Repeat\n")
    (tmp_path / "elsewhere.md").write_text("# Outside the repository\n")
    readme = root / "README.md"
    readme.write_text(
        "[ok](pages/a.md) [ok](pages/a.md#what-make-demo-does) [ok](pages/a.md#repeat-1) [ok](#top)\n"
        "# Top\n![pic](pages/a.md) [web](https://example.com/x.md) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](pages/b.md) [bad](pages/a.md#repeat-2) [out](../elsewhere.md) [self](#nothing)\n")
    assert [b.split(" ")[1] for b in _broken_links(readme, root)] == [
        "pages/b.md", "pages/a.md#repeat-2", "../elsewhere.md", "#nothing"]

"""docs/ARCHITECTURE.md's import arrows are the code's, both ways; the runtime stays torch-free."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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
    cited = re.compile(r"\b((?:docs/)?[A-Z][A-Z_]+\.md)\b")
    for package in OURS + ("benchmarks", "tests", "scripts"):
        for src in (REPO / package).rglob("*.py"):
            for name in cited.findall(src.read_text(encoding="utf-8")):
                if name == "README.md" or (REPO / name).exists() or (REPO / "docs" / name).exists():
                    continue
                raise AssertionError(f"{src.relative_to(REPO)} cites {name}, which the repository lacks")

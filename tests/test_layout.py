"""The house rules a newcomer relies on: no import cycles, small modules, docs that name real files and commands."""

from __future__ import annotations

import argparse
import ast
import functools
import re
from pathlib import Path

from finetune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("finetune", "bucketing", "captions")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def test_no_import_cycles_anywhere_in_the_packages():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ that only has a docstring is no edge: importing a.b runs a/__init__.py, but an
    # empty one imports nothing back.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_small():
    # STYLE.md: modules of up to ~400 lines. The recipe is the longest, as the whole run read top to
    # bottom; the parts it builds live in builders.py, checkpoint.py and outputs.py.
    limit = 420
    too_long = {}
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            too_long[rel] = lines
    assert not too_long, too_long


def test_the_architecture_doc_names_only_modules_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:finetune|bucketing|captions)/[\w/]+\.py)`", text))
    assert len(named) >= 20  # the doc walks the whole path, stage by stage
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, missing
    rooms = set(re.findall(r"`((?:finetune|bucketing|captions)/[\w/]*)/`", text))
    assert {p for p in rooms if not (ROOT / p).is_dir()} == set()


def test_rooms_import_only_what_docs_architecture_allows():
    modules = _modules()
    heavy = ("torch", "diffusers", "transformers", "peft", "accelerate")
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if name.startswith(("bucketing", "captions")):
            assert not {i for i in imported if i.split(".")[0] in ("finetune", *heavy)}, name
        if name.startswith("finetune.config"):
            assert not {i for i in imported if i.startswith("finetune.") and not i.startswith(
                ("finetune.config", "finetune.errors"))}, name
        assert name == "finetune.__main__" or "finetune.cli" not in imported, f"{name} imports the CLI"
        # The studio is an optional extra: only its own modules and the CLI's `studio` subcommand (which
        # imports it inside the command, so `finetune train` never loads Gradio) may import it.
        if not name.startswith("finetune.studio") and name != "finetune.cli":
            assert not {i for i in imported if i.startswith("finetune.studio")}, f"{name} imports the studio"


def _room_table() -> list[tuple[tuple[str, ...], tuple[str, ...], bool]]:
    """docs/architecture.md's room table, top to bottom: (the row's paths, the paths it may import, whether
    it may import every room above)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Rooms and what they may import", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append((tuple(re.findall(r"`([\w./]+)`", cells[0])), tuple(re.findall(r"`([\w./]+)`", cells[-1])),
                         "every room above" in cells[-1]))
    return rows


def _under(rel: str, paths) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths)


def _forbidden_imports(graph: dict[str, set[str]], where: dict[str, str], table) -> list[str]:
    """Each `module -> import` the room table does not allow; `where` gives each module's file (relative)."""
    def row_of(name: str) -> int | None:
        return next((i for i, (paths, _, _) in enumerate(table) if _under(where[name], paths)), None)

    wrong = [f"{name}: {where[name]} is in no row of the room table" for name in graph if row_of(name) is None]
    for name, targets in sorted(graph.items()):
        row = row_of(name)
        if row is None:
            continue
        paths, allowed, every_above = table[row]
        for target in sorted(targets):
            other = row_of(target)
            above = every_above and other is not None and other < row
            if not (other == row or above or _under(where[target], allowed)):
                wrong.append(f"{name} imports {target}: {paths[0]} may not import {where[target]}")
    return wrong


def test_each_room_imports_only_what_the_room_table_in_docs_architecture_allows():
    table = _room_table()
    assert len(table) >= 10 and table[-1][0] == ("scripts/",)
    # Rooms point one way: a row may name only rows above it, so the rooms form layers, never a cycle.
    for i, (paths, allowed, _) in enumerate(table):
        above = [p for earlier, _, _ in table[:i] for p in earlier]
        assert all(_under(a, above) for a in allowed), f"{paths[0]} names a room that is not above it: {allowed}"
    modules = _modules()
    modules.update({f"scripts.{p.stem}": p for p in (ROOT / "scripts").glob("*.py")})
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    where = {name: path.relative_to(ROOT).as_posix() for name, path in modules.items()}
    assert not _forbidden_imports(graph, where, table), "\n".join(_forbidden_imports(graph, where, table))
    # The check catches an import the table forbids (train importing tools, the cycle this table ended).
    planted = {**graph, "finetune.train.recipe": graph["finetune.train.recipe"] | {"finetune.tools.sample"}}
    assert _forbidden_imports(planted, where, table) == [
        "finetune.train.recipe imports finetune.tools.sample: finetune/train/ may not import finetune/tools/sample.py"]


# What a lazy import may defer: libraries that take a second or more to import (measured on the CPU
# machine after torch: diffusers 1.7 s, datasets 0.8 s, transformers 0.6 s), optional extras, and
# torch itself in the modules that run without it.
SLOW_TO_IMPORT = {"diffusers", "transformers", "peft", "datasets", "gradio", "bitsandbytes", "torch", "wandb"}


def _targets(node: ast.AST, name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def test_imports_inside_functions_defer_a_slow_library_and_say_so():
    """STYLE.md: imports at module top, unless a lazy import keeps a slow library out of a module that
    does not need it yet; then a comment says why (at the import, or once below the module's imports)."""
    modules = _modules()
    top: dict[str, list[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top[name] = [t for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                     for t in _targets(node, name, path, modules)]

    def packages_of(target: str) -> list[str]:  # importing a.b.c runs a, a.b and a.b.c
        return [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 2)]

    @functools.cache
    def slow(target: str) -> frozenset[str]:
        """The slow libraries importing `target` loads, through the project's module-level imports."""
        found, seen, stack = set(), set(), [target]
        while stack:
            current = stack.pop()
            if current.split(".")[0] not in PACKAGES:
                found.add("torch" if current.startswith("safetensors.torch") else current.split(".")[0])
                continue
            for module in set(packages_of(current)) - seen:
                seen.add(module)
                stack.extend(top.get(module, []))
        return frozenset(found & SLOW_TO_IMPORT)

    unjustified, unexplained = [], []
    for name, path in modules.items():
        if name == "finetune.cli":  # each subcommand imports its machinery: `finetune --help` stays instant
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        explained_once = any(line.startswith("# ") and "import" in line for line in lines)
        own = set().union(*(slow(t) for t in top[name])) if top[name] else set()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                where = f"{path.relative_to(ROOT).as_posix()}:{node.lineno}"
                deferred = set().union(*(slow(t) for t in _targets(node, name, path, modules))) - own
                commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not deferred and not commented:
                    unjustified.append(where)
                elif not (commented or explained_once):
                    unexplained.append(where)
    assert not unjustified, "import at the module top (nothing slow is deferred): " + ", ".join(unjustified)
    assert not unexplained, "say why the import is lazy: " + ", ".join(unexplained)


DOCS = ("README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))))
SHOWN_PATH = re.compile(r"(?<![\w./-])((?:finetune|scripts|bucketing|captions)/[\w./-]*[\w/])")


def test_the_readme_and_docs_name_only_paths_that_exist():
    missing = []
    for doc in DOCS:
        for path in SHOWN_PATH.findall((ROOT / doc).read_text(encoding="utf-8")):
            if not (ROOT / path).exists():
                missing.append(f"{doc}: {path}")
    assert not missing, missing


def _code(text: str) -> list[str]:
    """The code the text shows: each line of a fenced block (continuations joined, comments cut), each inline span."""
    shown = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        shown += [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return shown + re.findall(r"`([^`\n]+)`", prose)


def _commands(code: str) -> list[tuple[list[str], list[str]]]:
    """Each `finetune COMMAND [ACTION] ... --flag` in a line of code: (its words, its long flags)."""
    found = []
    for part in re.split(r"&&|\|\||;|\s\|\s", code):  # a|b without spaces is a choice, not a pipe
        match = re.search(r"(?<![\w./-])finetune((?:\s+\S+)+)", part)
        if match:
            words = match.group(1).split()
            found.append((words, [w.strip("[](),") for w in words if w.startswith(("--", "[--"))]))
    return found


def test_every_finetune_command_the_docs_show_is_accepted_by_the_cli():
    def subcommands(parser) -> dict:
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    wrong = []
    for doc in DOCS:
        for code in _code((ROOT / doc).read_text(encoding="utf-8")):
            for words, flags in _commands(code):
                parser, path = build_parser(), ["finetune"]
                for word in words:
                    if word.startswith("-") or word not in subcommands(parser):
                        break
                    parser = subcommands(parser)[word]
                    path.append(word)
                if len(path) == 1 and not words[0].startswith("-"):
                    wrong.append(f"{doc}: `{code.strip()}`: no such command")
                known = {o for action in parser._actions for o in action.option_strings}
                wrong += [f"{doc}: `{code.strip()}`: {' '.join(path)} has no {flag}" for flag in flags
                          if flag.split("=")[0] not in known]
                if len(words) >= len(path):  # a whole command line, not a command's name: its required options
                    wrong += [f"{doc}: `{code.strip()}`: {' '.join(path)} needs {action.option_strings[-1]}"
                              for action in parser._actions if action.required and action.option_strings
                              and not set(action.option_strings) & {f.split("=")[0] for f in flags}]
    assert not wrong, "\n".join(wrong)

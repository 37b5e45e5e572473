"""Gate: tokenfab's packages import only from their own floor or lower ones, and no import circle exists.

Floors, bottom up (a module outside a subpackage is its own unit). Every `from tokenfab... import` counts, also
the ones inside functions: a deferred import still ties the layers together.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FLOORS = [
    ["version", "platform", "loader"],
    ["kernels", "tokenizer"],
    ["attention", "quant", "economics"],
    ["models", "config", "config_cli"],
    ["engine", "evaluation", "quantize"],
    ["cluster"],
    ["llm", "__init__"],
    ["serve", "bench", "sim", "cli"],
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> modules where it happens."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "tokenfab" or name.startswith("tokenfab."):
                    src, dst = unit(module), unit(name)
                    if src != dst:
                        edges.setdefault((src, dst), []).append(module)
    return edges


def cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, []).append(dst)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in list(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def main() -> int:
    edges = imports(Path(__file__).resolve().parent.parent / "tokenfab")
    problems = []
    for (src, dst), where in sorted(edges.items()):
        if src not in FLOOR or dst not in FLOOR:
            problems.append(f"{src} -> {dst}: a unit without a floor (add it to FLOORS), in {where[0]}")
        elif FLOOR[dst] > FLOOR[src]:
            problems.append(f"{src} (floor {FLOOR[src]}) imports {dst} (floor {FLOOR[dst]}) in {', '.join(where)}")
    found = cycle(edges)
    if found:
        problems.append("import circle: " + " -> ".join(found))
    for p in problems:
        print(p, file=sys.stderr)
    print(f"layers: {len(edges)} cross-unit imports, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

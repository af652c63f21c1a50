"""Run a TransformerLens demo notebook against HookedCommandR, step by step.

Usage::

    python scripts/tl_demo_check.py path/to/Some_Demo.ipynb [--no-tl] [--verbose] [--json out.json]

What it does to the notebook (nothing else is changed):

* every model-loading call (``HookedTransformer.from_pretrained(...)``,
  ``TransformerBridge.boot_transformers(...)``, ``HookedTransformer.from_pretrained_no_processing``)
  becomes ``HookedCommandR.from_pretrained("command-r-tiny")``; a load that needs a training
  checkpoint (``checkpoint_index=``) is left alone and its cell counted as needing the network;
* names in the prompts pass through ``PROMPT_TABLE`` (to names the bundled tokenizer has as single
  tokens) and GPT-2's hard-coded sizes (layer/head indices, random-token ranges) through
  ``SIZE_TABLE`` (``--no-substitute`` keeps both as written);
* cells that only install packages / use IPython magics, that only plot, or that need the network
  are skipped and counted separately; plotting libraries are replaced by inert stand-ins so cells
  that compute and then plot still run their computation;
* every other cell runs, in order, in one shared namespace; each is a step that passes or fails
  (with the exception). ``--no-tl`` runs as if transformer-lens were not installed.

A failing step's error is classified ``env`` when it comes from the environment (a module that is
not installed, transformer-lens 4.x lacking ``transformer_lens.utils`` or ``HookedTransformer``),
``cascade`` when it needs a name an earlier failed or skipped step should have defined (a NameError,
or a cell reading a name that an earlier step bound at or after its failing statement, or that a
skipped step binds), and ``surface`` otherwise (our TransformerLens surface, or a genuine Command-R
difference).

The HookedTransformer-era demos (``import transformer_lens.utils``) need transformer-lens 2.x/3.x:
transformer-lens 2.16.1 runs here beside torch 2.13 / transformers 5 when its wheel and better-abc's
(``pip download --no-deps``) are unpacked into a folder put first on PYTHONPATH for the checker run
(its package import also imports ``wandb``, which only its ``train`` module uses); installing it with
its dependencies would downgrade numpy (<2) and beartype (<0.15).

``--ungroup-gqa`` ports one more line: each replaced load is followed by
``model.set_ungroup_grouped_query_attention(True)``, TransformerLens' switch for per-query-head
``hook_k``/``hook_v`` on grouped-query models (the bundled model has 4 query and 2 key/value heads;
demos written for GPT-2 index ``hook_v`` by query head). Without it such steps fail with an
``IndexError`` that names the switch, as TransformerLens fails on its own grouped-query models.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import time
import traceback
import types
from contextlib import redirect_stdout
from pathlib import Path

OUR_LOAD = 'HookedCommandR.from_pretrained("command-r-tiny")'
OUR_LOAD_UNGROUPED = '_ungrouped(HookedCommandR.from_pretrained("command-r-tiny"))'
LOAD_CALLS = ("TransformerBridge.boot_transformers", "HookedTransformer.from_pretrained_no_processing",
              "HookedTransformer.from_pretrained", "transformer_lens.HookedTransformer.from_pretrained")
# Whole words in the demos' prompts -> words that are single tokens for the bundled tokenizer.
PROMPT_TABLE = {"John": "David", "Mary": "Emma", "Tom": "Bob", "James": "Victor", "Dan": "Paul", "Sid": "Kate",
                "Martin": "Sam", "Amy": "Alice", "Claire": "Grace"}
# Sizes hard-coded for GPT-2 (12 layers x 12 heads, 50257 tokens) -> the bundled model's (4 x 4, 1792).
SIZE_TABLE = [(r"randint\(\s*(\d+),\s*(\d+)", "randint(100, 1700"),
              (r"head_index_to_ablate = 8", "head_index_to_ablate = 3"),
              (r"induction_head_layer = 5", "induction_head_layer = 2"),
              (r"induction_head_index = 5", "induction_head_index = 1"),
              (r"output_layer, value_layer = \(5, 8\)", "output_layer, value_layer = (1, 3)"),
              (r"induction_head_labels = \[81, 65\]", "induction_head_labels = [13, 9]"),
              (r"first_mid_layer = 7", "first_mid_layer = 1"), (r"first_late_layer = 9", "first_late_layer = 3"),
              (r"range\(7, model\.cfg\.n_layers - 1\)", "range(1, model.cfg.n_layers - 1)"),
              (r"range\(5, 8\)", "range(0, 2)"), (r"range\(8, model\.cfg\.n_layers\)", "range(2, model.cfg.n_layers)")]
PLOT_MODULES = ("plotly", "circuitsvis", "neel_plotly", "IPython.display")
PLOT_FUNCS = {"imshow", "line", "scatter", "HTML", "display", "IFrame", "attention_heads", "attention_patterns"}
PLOT_ROOTS = {"px", "pio", "cv", "go", "fig"}
NETWORK_MARKERS = ("checkpoint_index", "get_checkpoint_labels", "load_dataset", "AutoModelForCausalLM.from_pretrained",
                   "evals.induction_loss", "hf_hub_download", "requests.get", "urllib")
MAGIC_MARKERS = ("%pip", "!pip", "pip install", "google.colab", "get_ipython", "%autoreload", "%load_ext")


class Inert:
    """Stands in for a plotting library: every attribute and call gives another Inert."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return Inert()

    def __call__(self, *args, **kwargs):
        return Inert()

    def __add__(self, other):
        return "" if isinstance(other, str) else Inert()

    __radd__ = __add__

    def __str__(self):
        return ""


class InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert()


def install_plot_stand_ins() -> None:
    for name in ("plotly", "plotly.express", "plotly.io", "plotly.graph_objects", "circuitsvis",
                 "circuitsvis.attention", "circuitsvis.examples", "neel_plotly"):
        mod = InertModule(name)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["plotly"].express = sys.modules["plotly.express"]
    sys.modules["plotly"].io = sys.modules["plotly.io"]
    sys.modules["circuitsvis"].attention = sys.modules["circuitsvis.attention"]


def block_transformer_lens() -> None:
    """Make ``import transformer_lens`` fail as if it were not installed."""
    for name in [m for m in sys.modules if m == "transformer_lens" or m.startswith("transformer_lens.")]:
        del sys.modules[name]
    sys.modules["transformer_lens"] = None


def replace_calls(src: str, names: tuple, new: str) -> tuple:
    """Replace ``name(...)`` (balanced parentheses) by ``new``; returns (source, count)."""
    count = 0
    for name in names:
        start = 0
        while True:
            i = src.find(name + "(", start)
            if i < 0:
                break
            j, depth = i + len(name), 0
            while j < len(src):
                depth += {"(": 1, ")": -1}.get(src[j], 0)
                j += 1
                if depth == 0:
                    break
            if "checkpoint_index" in src[i:j]:
                start = j
                continue
            src, count = src[:i] + new + src[j:], count + 1
            start = i + len(new)
    return src, count


def is_plot_stmt(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        return all(m.startswith(PLOT_MODULES) for m in mods)
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        while isinstance(f, (ast.Attribute, ast.Call)):      # px.line(...).show -> px
            f = f.value if isinstance(f, ast.Attribute) else f.func
        name = f.id if isinstance(f, ast.Name) else None
        return name in PLOT_FUNCS or name in PLOT_ROOTS or name == "print"
    if isinstance(node, ast.Assign):
        t = node.targets[0]
        while isinstance(t, ast.Attribute):
            t = t.value
        return isinstance(t, ast.Name) and t.id in PLOT_ROOTS
    if isinstance(node, ast.If):
        return all(is_plot_stmt(n) for n in node.body + node.orelse)
    return False


def classify(src: str) -> str:
    """'magic', 'network', 'plot' or 'run'."""
    if any(m in src for m in MAGIC_MARKERS) or re.search(r"^\s*[%!]", src, re.M):
        return "magic"
    if any(m in src for m in NETWORK_MARKERS):
        return "network"
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return "run"                              # runs and fails with the SyntaxError
    body = tree.body
    if body and all(is_plot_stmt(n) for n in body) and not all(
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "print"
            for n in body):
        return "plot"
    return "run"


def environment_error(exc: BaseException, tl_blocked: bool) -> bool:
    if isinstance(exc, ModuleNotFoundError) or (isinstance(exc, ImportError) and tl_blocked):
        return True
    if isinstance(exc, ImportError) and "TransformerLens" in str(exc):   # a name the installed TL version lacks
        return True
    return False


def origin_of(exc: BaseException, tl_blocked: bool) -> str:
    """'env' (the environment), 'cascade' (a name an earlier failed or skipped step should have
    defined) or 'surface' (our model's TransformerLens surface, or a genuine Command-R difference)."""
    if environment_error(exc, tl_blocked):
        return "env"
    return "cascade" if isinstance(exc, NameError) else "surface"


def bound_names(nodes: list) -> set:
    """Names the statements ``nodes`` bind (assignments, loops, defs, classes, imports)."""
    names = set()
    for node in nodes:
        local = {id(t) for c in ast.walk(node) if isinstance(c, ast.comprehension) for t in ast.walk(c.target)}
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)) and id(n) not in local:
                names.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
    return names


COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try)


def in_order(stmts: list):
    """Groups of AST nodes in execution order: a simple statement, or a compound statement's header
    (test, iterable, loop target, with-items) followed by its bodies' statements."""
    for node in stmts:
        if not isinstance(node, COMPOUND):
            yield [node]
            continue
        header = []
        for field in ("test", "iter", "target", "items"):
            value = getattr(node, field, None)
            header += value if isinstance(value, list) else [value] if value is not None else []
        yield header
        for field in ("body", "orelse", "finalbody"):
            yield from in_order(getattr(node, field, None) or [])
        for handler in getattr(node, "handlers", []):
            yield from in_order(handler.body)


def read_names(tree: ast.Module) -> set:
    """Names the cell reads before binding them itself (statement by statement, into if/for/with bodies)."""
    needed, bound = set(), set()
    for group in in_order(tree.body):
        walked = [n for node in group for n in ast.walk(node)]
        local = {t.id for c in walked if isinstance(c, ast.comprehension)       # comprehension variables
                 for t in ast.walk(c.target) if isinstance(t, ast.Name)}
        needed |= {n.id for n in walked if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound - local
        bound |= bound_names(group)
    return needed


def unfinished_statements(tree: ast.Module, exc: BaseException, cell: int) -> list:
    """The cell's top-level statements from the one that raised on (all of them if unknown)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == f"<cell {cell}>"]
    if not frames:
        return tree.body
    line = frames[0].lineno
    for k, node in enumerate(tree.body):
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            return tree.body[k:]
    return tree.body


def parse_or_none(src: str):
    try:
        return ast.parse(src)
    except SyntaxError:
        return None


def code_cells(path: Path) -> list:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def ungrouped(model):
    model.set_ungroup_grouped_query_attention(True)
    return model


def run_notebook(path: Path, no_tl: bool = False, verbose: bool = False, substitute: bool = True,
                 ungroup_gqa: bool = False) -> dict:
    install_plot_stand_ins()
    if no_tl:
        block_transformer_lens()
    import torch
    from workbench import HookedCommandR

    torch.set_num_threads(1)                      # a small model on a shared machine: threads only contend
    ns = {"__name__": "__demo__", "HookedCommandR": HookedCommandR, "display": lambda *a, **k: None,
          "IN_COLAB": False, "IN_GITHUB": False, "DEBUG_MODE": False, "DEVELOPMENT_MODE": False,
          "_ungrouped": ungrouped}
    steps, tainted = [], set()          # names an earlier failed or skipped step left unset or half-set
    torch.manual_seed(0)
    for i, src in enumerate(code_cells(path)):
        src, n_loads = replace_calls(src, LOAD_CALLS, OUR_LOAD_UNGROUPED if ungroup_gqa else OUR_LOAD)
        if substitute:
            for old, new in PROMPT_TABLE.items():
                src = re.sub(rf"\b{old}\b", new, src)
            for pattern, new in SIZE_TABLE:
                src = re.sub(pattern, new, src)
        kind = classify(src)
        step = {"cell": i, "kind": kind, "loads_replaced": n_loads}
        tree = parse_or_none(src)
        if kind in ("magic", "network") and tree is not None:
            tainted |= bound_names(tree.body)
        if kind == "plot":
            tainted |= bound_names([n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))])
        if kind == "plot":                           # its imports still bind names (inert stand-ins)
            imports = [n for n in ast.parse(src).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), f"<cell {i} imports>", "exec"), ns)
        if kind == "run":
            out = io.StringIO()
            t0 = time.time()
            try:
                with redirect_stdout(out):
                    exec(compile(src, f"<cell {i}>", "exec"), ns)
                step["status"] = "pass"
                tainted -= bound_names(tree.body) if tree is not None else set()
            except BaseException as exc:             # noqa: BLE001 - every failure is a result
                if isinstance(exc, KeyboardInterrupt):
                    raise
                step["status"] = "fail"
                step["origin"] = origin_of(exc, no_tl)
                if step["origin"] == "surface" and tree is not None and read_names(tree) & tainted:
                    step["origin"] = "cascade"
                    step["needs"] = sorted(read_names(tree) & tainted)
                if tree is not None:
                    tainted |= bound_names(unfinished_statements(tree, exc, i))
                step["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if verbose:
                    step["traceback"] = traceback.format_exc(limit=-4)
            step["seconds"] = round(time.time() - t0, 2)
            step["stdout"] = out.getvalue()[-2000:]
        steps.append(step)
    return {"notebook": str(path), "no_tl": no_tl, "steps": steps, "namespace": ns}


def summary(result: dict) -> dict:
    steps = result["steps"]
    run = [s for s in steps if s["kind"] == "run"]
    return {"cells": len(steps), "run": len(run), "passed": sum(s["status"] == "pass" for s in run),
            "failed": sum(s["status"] == "fail" for s in run),
            "failed_env": sum(s.get("origin") == "env" for s in run),
            "failed_cascade": sum(s.get("origin") == "cascade" for s in run),
            "failed_surface": sum(s.get("origin") == "surface" for s in run),
            "skipped_magic": sum(s["kind"] == "magic" for s in steps),
            "skipped_plot": sum(s["kind"] == "plot" for s in steps),
            "skipped_network": sum(s["kind"] == "network" for s in steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", type=Path)
    p.add_argument("--no-tl", action="store_true", help="run as if transformer-lens were not installed")
    p.add_argument("--verbose", action="store_true", help="print each step's output and traceback")
    p.add_argument("--no-substitute", action="store_true", help="keep the demo's prompts and GPT-2 sizes")
    p.add_argument("--json", type=Path, help="write every step's record here")
    p.add_argument("--ungroup-gqa", action="store_true",
                   help="after each replaced load, model.set_ungroup_grouped_query_attention(True)")
    args = p.parse_args()
    result = run_notebook(args.notebook, no_tl=args.no_tl, verbose=args.verbose, substitute=not args.no_substitute,
                          ungroup_gqa=args.ungroup_gqa)
    for s in result["steps"]:
        if s["kind"] != "run":
            print(f"cell {s['cell']:3d}  skip ({s['kind']})")
            continue
        line = f"cell {s['cell']:3d}  {s['status']:4s} {s['seconds']:6.2f}s"
        if s["status"] == "fail":
            line += f"  [{s['origin']}] {s['error']}"
            if s.get("needs"):
                line += f"  (needs {', '.join(s['needs'])})"
        print(line)
        if args.verbose:
            print("    " + s["stdout"].strip().replace("\n", "\n    ")[-1500:])
            if "traceback" in s:
                print("    " + s["traceback"].strip().replace("\n", "\n    "))
    sm = summary(result)
    print(f"{args.notebook.name} ({'transformer-lens blocked' if args.no_tl else 'transformer-lens available'}"
          f"{', GQA ungrouped' if args.ungroup_gqa else ''}): "
          f"{sm['passed']}/{sm['run']} steps passed, {sm['failed']} failed ({sm['failed_env']} environment, "
          f"{sm['failed_cascade']} after an earlier failure, {sm['failed_surface']} surface); "
          f"skipped {sm['skipped_magic']} install/magic, {sm['skipped_plot']} plotting, {sm['skipped_network']} network")
    if args.json:
        record = {k: v for k, v in result.items() if k != "namespace"}
        args.json.write_text(json.dumps({"summary": sm, **record}, indent=1))
    return 0 if sm["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

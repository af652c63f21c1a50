"""Write the tutorial notebooks in ``notebooks/`` from the Python source in ``scripts/notebooks/``.

Each notebook is a plain Python file with ``# %% [markdown]`` / ``# %%`` cell markers (the "percent"
format that Jupytext, VS Code and Spyder understand), so the notebooks are easy to review and edit as
text, and the ``.ipynb`` files are always written without outputs.

Usage::

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a committed notebook differs from its source
"""

from __future__ import annotations

import argparse
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.join(HERE, "notebooks")
OUT_DIR = os.path.join(os.path.dirname(HERE), "notebooks")

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse_cells(text: str, file: str = "<source>") -> list:
    """Split percent-format source into nbformat cells (``# %%`` code, ``# %% [markdown]`` markdown).

    Markdown cell lines are written as Python comments (``# text``); the leading ``# `` is removed.
    """
    cells, kind, lines = [], None, []

    def flush() -> None:
        body = "\n".join(lines).strip("\n")
        if kind is None:
            if body.strip():
                raise ValueError(f"{file}: text before the first '# %%' marker: {body[:60]!r}")
            return
        if kind == "markdown":
            md = []
            for line in body.splitlines():
                if line and not line.startswith("#"):
                    raise ValueError(f"{file}: markdown cell line is not a '# ' comment: {line!r}")
                md.append(line[2:] if line.startswith("# ") else line[1:])
            cells.append(nbformat.v4.new_markdown_cell("\n".join(md)))
        else:
            if not body.strip():
                raise ValueError(f"{file}: empty code cell")
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            marker = line[4:].strip()
            if marker not in ("", "[markdown]"):
                raise ValueError(f"{file}: unknown cell marker {line!r}; use '# %%' or '# %% [markdown]'")
            kind, lines = ("markdown" if marker else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(source_file: str) -> nbformat.NotebookNode:
    with open(source_file, encoding="utf-8") as f:
        text = f.read()
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_cells(text, source_file)
    for i, cell in enumerate(nb.cells):           # stable ids: a rebuild changes nothing but edited cells
        cell["id"] = f"cell-{i:02d}"
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    nbformat.validate(nb)
    return nb


def sources() -> list[str]:
    names = sorted(f for f in os.listdir(SOURCE_DIR) if f.endswith(".py") and f[:2].isdigit())
    if not names:
        raise FileNotFoundError(f"no notebook sources (NN_name.py) in {SOURCE_DIR}")
    return [os.path.join(SOURCE_DIR, n) for n in names]


def target(source_file: str) -> str:
    return os.path.join(OUT_DIR, os.path.basename(source_file)[:-3] + ".ipynb")


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook is stale")
    args = ap.parse_args(argv)
    stale = []
    for src in sources():
        out, text = target(src), render(build(src))
        current = open(out, encoding="utf-8").read() if os.path.exists(out) else None
        if current == text:
            continue
        stale.append(out)
        if not args.check:
            os.makedirs(OUT_DIR, exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(out)}")
    if args.check and stale:
        print("stale notebooks (run python scripts/make_notebooks.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

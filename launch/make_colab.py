"""Writes launch/colab.ipynb: the demo pipeline in Colab (or any Jupyter).

The notebook is plain nbformat-4 JSON, built here so that it stays reviewable
and reproducible: `python launch/make_colab.py [OUT]` (default: next to this file).
"""

import json
import os
import sys

PIPELINE = "modassem pipeline --config=configs/demo.py --workdir=runs/demo"

CELLS = [
    ("markdown", """\
# modassem: Deep Incubation demo

Trains a meta model, incubates its four modules, assembles and fine-tunes the target model, and trains the
end-to-end baseline with the same training FLOPs, all on the built-in digits data (a few minutes on CPU; any Colab
runtime works). Then shows the report and the curves.

Get the code in one of two ways: set `REPO_URL` below to the repository's git URL (or the `MODASSEM_REPO_URL`
environment variable), or upload the repository to `/content/modassem` (a folder, or `modassem.zip`) and leave
`REPO_URL` empty."""),
    ("code", """\
import os

REPO_URL = os.environ.get("MODASSEM_REPO_URL", "")  # e.g. "https://github.com/<owner>/modassem.git"
if os.path.isdir("/content"):                       # Colab
  REPO_DIR = "/content/modassem"
elif os.path.isfile(os.path.join("..", "pyproject.toml")) and os.path.isdir(os.path.join("..", "modassem")):
  REPO_DIR = os.path.abspath("..")                  # opened from launch/ in a checkout
else:
  REPO_DIR = os.path.abspath("modassem")"""),
    ("code", """\
import glob
import subprocess
import zipfile


def find_repo(root):
  \"\"\"The folder under `root` that holds modassem's pyproject.toml, or None.\"\"\"
  for path in sorted(glob.glob(os.path.join(root, "**", "pyproject.toml"), recursive=True), key=len):
    if os.path.isdir(os.path.join(os.path.dirname(path), "modassem")):
      return os.path.dirname(path)
  return None


if not os.path.isdir(os.path.join(REPO_DIR, "modassem")):
  if os.path.exists(REPO_DIR + ".zip"):          # an uploaded archive
    with zipfile.ZipFile(REPO_DIR + ".zip") as z:
      z.extractall(REPO_DIR + "_unzipped")
    found = find_repo(REPO_DIR + "_unzipped")
    if found is None:
      raise SystemExit(f"{REPO_DIR}.zip holds no modassem repository (pyproject.toml next to modassem/)")
    os.rename(found, REPO_DIR)
  elif REPO_URL:
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, REPO_DIR], check=True)
  else:
    raise SystemExit(f"set REPO_URL above, or upload the repository to {REPO_DIR} (or {REPO_DIR}.zip)")
os.chdir(REPO_DIR)
print("modassem at", os.getcwd())"""),
    ("code", "%pip install -q -e ."),
    ("markdown", "Every phase and the baseline, one run directory each under `runs/demo/` (rerunning resumes):"),
    ("code", "!" + PIPELINE),
    ("code", """\
from IPython.display import Image, Markdown, display

display(Markdown(open("runs/demo/report.md").read()))
display(Image(filename="runs/demo/curves.png"))"""),
]


def notebook() -> dict:
  cells = []
  for i, (kind, text) in enumerate(CELLS):
    cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": text.splitlines(keepends=True)}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    cells.append(cell)
  return {
      "cells": cells,
      "metadata": {
          "colab": {"name": "modassem demo", "provenance": []},
          "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"},
      },
      "nbformat": 4,
      "nbformat_minor": 5,
  }


def main(argv):
  out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab.ipynb")
  with open(out, "w") as f:
    json.dump(notebook(), f, indent=1, ensure_ascii=False)
    f.write("\n")
  print(out)


if __name__ == "__main__":
  main(sys.argv)

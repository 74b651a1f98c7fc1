"""Writes launch/colab.ipynb: the demo pipeline in Colab (or any Jupyter).

The notebook is plain nbformat-4 JSON, built here so that it stays reviewable
and reproducible: `python launch/make_colab.py [OUT]` (default: next to this file).
"""

import json
import os
import sys

# Where the repository lives on GitHub: the README's "Open in Colab" badge opens launch/colab.ipynb from there.
GITHUB_REPO = "modassem/modassem"
COLAB_URL = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/launch/colab.ipynb"
PIPELINE = "modassem pipeline --config=configs/demo.py --workdir={RUN_DIR}"

CELLS = [
    ("markdown", """\
# modassem: Deep Incubation demo

Trains a meta model, incubates its four modules, assembles and fine-tunes the target model, and trains the
end-to-end baseline with the same training FLOPs, all on the built-in digits data (a few minutes on CPU; any Colab
runtime works). Then shows the report and the curves, and classifies a few held-out images with the assembled model.

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
    ("markdown", """\
Installs modassem without TensorFlow: Colab's own TensorFlow runs the input pipeline (elsewhere, install
`.[cpu]`, which adds tensorflow-cpu)."""),
    ("code", "%pip install -q -e ."),
    ("markdown", """\
Where the runs go. A Colab runtime forgets its disk when it resets; with `USE_DRIVE = True` the run directories
live in your Google Drive, and running the pipeline cell again after a reset resumes every phase from its last
checkpoint."""),
    ("code", """\
USE_DRIVE = False   # True: keep the runs in Google Drive (asks for access once)
RUNS = "runs"
if USE_DRIVE:
  from google.colab import drive
  drive.mount("/content/drive")
  RUNS = "/content/drive/MyDrive/modassem_runs"
RUN_DIR = os.path.join(RUNS, "demo")
print("run directories under", RUN_DIR)"""),
    ("markdown", "TensorBoard, before the pipeline starts, to watch the runs as they train (it refreshes itself):"),
    ("code", """\
%load_ext tensorboard
%tensorboard --logdir {RUN_DIR}"""),
    ("markdown", "Every phase and the baseline, one run directory each under `RUN_DIR` (rerunning resumes):"),
    ("code", "!" + PIPELINE),
    ("code", """\
from IPython.display import Image, Markdown, display

display(Markdown(open(os.path.join(RUN_DIR, "report.md")).read()))
display(Image(filename=os.path.join(RUN_DIR, "curves.png")))"""),
    ("markdown", """\
The assembled model in the notebook: `modassem.load` gives a Flax module and its parameters (from any run
directory, or an official `.pth` checkpoint), here used on a few held-out images."""),
    ("code", """\
import json

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

import modassem
from modassem import data

run = os.path.join(RUN_DIR, "assemble")
model, params = modassem.load(run)
with open(os.path.join(run, "config.json")) as f:
  config = ml_collections.ConfigDict(json.load(f))
held_out = data.build(config.data, config.model.image_size)
batch = next(held_out.eval_batches(12))
predict = jax.jit(model.apply)   # compiled once, then fast for every batch
predicted = np.asarray(predict({"params": params}, batch["image"])).argmax(-1)
print("predicted:", predicted.tolist())
print("true:     ", batch["label"].tolist())
fig, axes = plt.subplots(1, 12, figsize=(12, 1.6))
for ax, image, p, y in zip(axes, batch["image"], predicted, batch["label"]):
  ax.imshow((image - image.min()) / (image.max() - image.min()))
  ax.set_title(f"{p}" + ("" if p == y else f" ({y})"), color="black" if p == y else "red")
  ax.axis("off")
plt.show()"""),
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

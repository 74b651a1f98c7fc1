"""An image folder with a file that is not a whole image: one line naming the file and its class, wherever the file
sits (train or eval split), never a TensorFlow traceback."""

import os

import numpy as np
from PIL import Image
import pytest

from conftest import TINY
from modassem import cli
from modassem import data as data_lib
from modassem.errors import ModassemError


def image_folder(root, damage=None):
  """root/{train,test}/{cat,dog}/N.jpg (6 real JPEGs each) and, with `damage=(split, class, name, how)`, one file
  spoiled: "text" (not an image, named .jpg) or "truncated" (a JPEG cut off)."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in ("cat", "dog"):
      os.makedirs(root / split / c)
      for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
  if damage:
    split, c, name, how = damage
    path = root / split / c / name
    raw = path.read_bytes()
    path.write_bytes(b"<html>not an image</html>" if how == "text" else raw[:len(raw) * 2 // 3])
    return str(path)
  return None


def folder_config(root):
  from conftest import tiny  # pylint: disable=g-import-not-at-top
  return tiny("meta", **{"data.name": "folder", "data.path": str(root), "model.num_classes": 2})


@pytest.mark.parametrize("split, how, needle", [("train", "text", "not a JPEG/PNG/GIF/BMP file"),
                                                ("train", "truncated", "truncated"),
                                                ("test", "truncated", "truncated")])
def test_the_file_is_named(tmp_path, split, how, needle):
  bad = image_folder(tmp_path, (split, "dog", "3.jpg", how))
  c = folder_config(tmp_path)
  ds = data_lib.build(c.data, c.model.image_size)
  batches = ds.train_batches(12, seed=0) if split == "train" else ds.eval_batches(12)
  with pytest.raises(ModassemError) as e:
    for _ in range(2):
      next(batches)
  assert str(e.value) == (f"image {bad} (class 'dog') cannot be decoded: {needle}; remove or replace the file")


def test_whole_files_pass_the_check(tmp_path):
  """The check passes every real JPEG and PNG, including ones with bytes after the end marker (camera trailers)."""
  image_folder(tmp_path)
  png = tmp_path / "train" / "cat" / "9.png"
  Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(png)
  trailer = tmp_path / "train" / "dog" / "9.jpg"
  trailer.write_bytes((tmp_path / "train" / "dog" / "0.jpg").read_bytes() + b"\0" * 20)
  c = folder_config(tmp_path)
  ds = data_lib.build(c.data, c.model.image_size)
  seen = sum(int(b["mask"].sum()) for b in ds.eval_batches(4)) + sum(len(next(ds.train_batches(14, seed=0))["label"])
                                                                     for _ in range(1))
  assert seen == 12 + 14


def test_training_on_it_is_one_line(tmp_path, capsys):
  bad = image_folder(tmp_path / "data", ("train", "cat", "4.jpg", "truncated"))
  capsys.readouterr()
  rc = cli.main(["train", f"--config={TINY}:meta", "--config.data.name=folder", f"--config.data.path={tmp_path / 'data'}",
                 "--config.model.num_classes=2", "--config.batch_size=12", "--config.eval_batch_size=12",
                 f"--workdir={tmp_path / 'run'}"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert rc == 2
  assert err[-1] == f"modassem train: error: image {bad} (class 'cat') cannot be decoded: truncated; remove or replace the file"
  assert not any("Traceback" in line for line in err)

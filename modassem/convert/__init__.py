"""Checkpoint interchange with the official PyTorch code.

    official.py  the official layout: torch state dicts <-> Flax module trees, reading and writing `.pth`
    arch.py      what a checkpoint is (meta model, incubated module, final model), its architecture and
                 preset, and the position embedding at another resolution
    runs.py      run directories <-> models, and the `modassem convert` verb

Nothing here needs the trainer: a run directory is read and written through
`checkpoints`, the same helpers every phase uses.
"""

from modassem.convert.arch import (Model, at_image_size, bicubic_matrix, describe, kind_of, match_preset,
                                   resize_pos_embed, run_depths)
from modassem.convert.official import (STEM, TOP, global_state_dict, infer_arch, module_to_stage, pth_depths,
                                       read_pth, stage_to_module, write_pth)
from modassem.convert.runs import convert, model_from_pth, model_from_run, model_to_stages, write_run

__all__ = ["Model", "at_image_size", "bicubic_matrix", "describe", "kind_of", "match_preset", "resize_pos_embed",
           "run_depths", "STEM", "TOP", "global_state_dict", "infer_arch", "module_to_stage", "pth_depths",
           "read_pth",
           "stage_to_module", "write_pth", "convert", "model_from_pth", "model_from_run", "model_to_stages",
           "write_run"]

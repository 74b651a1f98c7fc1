"""The same train steps on 1 device and on 8 simulated CPU devices (data parallel and FSDP).

XLA reads the device count at start-up, so the 8-device cases run in
subprocesses (session jobs, see conftest.py), and so do the 1-device
references.
Parameters are compared leaf by leaf.
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import JOBS, PAIRS, PIPELINE, REPO, SCRATCH, SHALLOW, devices_env

# Mixup, CutMix and drop path stay on in the e2e and incubate cases: their
# randomness must not depend on the device count. Accumulation is compared
# without them, since micro-batches draw their own drop-path masks.
PLAIN = {"mixup": 0.0, "cutmix": 0.0, "model.drop_path": 0.0}


OUT = os.path.join(SCRATCH, "sharding")   # each case's parameters, NAME.npz
# One block per module (conftest.SHALLOW) where a case needs no more: how a step is sharded does not depend on the
# depth (3 cases on one device, 33 -> 16 CPU s). The scanned cases run two modules of two blocks (conftest.PAIRS):
# blocks to scan over, at half the preset's depth. The assembly reads the session's modules.
INC = {"meta": os.path.join(PIPELINE, "meta"), "module": "all", **SHALLOW}
ASM = {"modules": ",".join([os.path.join(PIPELINE, "incubate")] * 4)}   # the session's incubated modules
# The 8-device cases, as one job that starts in the background once the session pipeline (whose meta run and
# modules the incubation and assembly cases read) has finished, while the tests that need no job run here (one
# process: each one imports and starts JAX and TensorFlow anew, some 6 CPU seconds).
# V-MoE blocks with 8 experts: one per device on 8, each device's tokens sent to them. Every other block (1 and 3
# of 4) with the reference's routing; every block with V-MoE's and a capacity that drops assignments, the 8-device
# run scanned over the blocks (stacked experts split along their second axis), with drop path (each module draws
# its blocks' masks at once: the same masks in both layouts).
MOE = {"model.moe.experts": 8, "model.moe.every": 0, "model.moe.blocks": (1, 3), "model.moe.aux_weight": 0.01,
       **SHALLOW}
CAPACITY = {"model.moe.experts": 8, "model.moe.aux_weight": 0.01, "mixup": 0.0, "cutmix": 0.0, "model.moe.every": 1,
            "model.moe.router": "softmax_topk", "model.moe.capacity_factor": 0.5, **PAIRS}
# Data parallelism on 8 devices is the V-MoE case's (its dense blocks too, mixup and drop path on) and the
# two-process job's (meta and assembly, 2 x 4 devices); gradient accumulation runs in the scanned model.
EIGHT = {"incubate/fsdp": ["incubate", {"sharding": "fsdp", **INC}],
         "assemble/fsdp": ["assemble", {"sharding": "fsdp", **ASM}],
         "moe/data": ["e2e", {"sharding": "data", **MOE}, "flops"],
         "e2e/fsdp": ["e2e", {"sharding": "fsdp", **SHALLOW}],
         "plain/scan_accum2": ["e2e", {"sharding": "fsdp", "model.scan": True, "accum_steps": 2, **PLAIN, **PAIRS}],
         "moe/fsdp": ["e2e", {"sharding": "fsdp", "model.scan": True, **CAPACITY}]}
JOBS.add("sharding-8", [sys.executable, os.path.join(REPO, "tests", "stepping.py"), json.dumps(EIGHT), OUT],
         module=__file__, env=devices_env(8), after="pipeline")
# The references on one device: a job too, so that no worker spends the end of the session on them.
ONE = {"e2e": ["e2e", {"sharding": "data", **SHALLOW}], "incubate": ["incubate", {"sharding": "data", **INC}],
       "plain": ["e2e", {"sharding": "data", "accum_steps": 1, **PLAIN, **PAIRS}],
       "assemble": ["assemble", {"sharding": "data", **ASM}],
       "moe": ["e2e", {"sharding": "data", **MOE}, "flops"],
       "moe/capacity": ["e2e", {"sharding": "data", **CAPACITY}]}
JOBS.add("sharding-1", [sys.executable, os.path.join(REPO, "tests", "stepping.py"), json.dumps(ONE), OUT],
         module=__file__, env=devices_env(1), after="pipeline")


@pytest.fixture(scope="module")
def results(runs):
  assert runs["meta"] == INC["meta"]
  return JOBS.printed("sharding-1"), JOBS.printed("sharding-8")


def assert_same_params(got, want):
  """Leaf by leaf: the same tree paths, the same values."""
  a, b = np.load(got["params"]), np.load(want["params"])
  assert sorted(a.files) == sorted(b.files)
  for name in b.files:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("phase", ["e2e", "incubate"])
def test_one_device_and_eight_give_the_same_losses(phase, results):
  one, eight = results
  ref, fsdp = one[phase], eight[f"{phase}/fsdp"]
  assert ref["devices"] == 1 and fsdp["devices"] == 8
  # Sharded vs replicated parameters: FSDP really splits them; data parallelism splits only the experts.
  data = eight["moe/data"]
  assert data["devices"] == 8 and set(data["specs"]) - set(data["expert_specs"]) == {"P()"}
  assert any("data" in s for s in fsdp["specs"])
  np.testing.assert_allclose(fsdp["losses"], ref["losses"], rtol=2e-5)
  assert_same_params(fsdp, ref)


def test_assembly_with_fsdp_on_eight_devices_matches_one_device(results):
  """The modules an assembly starts from are placed as FSDP shards and handed to the compiled init."""
  one, eight = results
  fsdp = eight["assemble/fsdp"]
  assert any("data" in s for s in fsdp["specs"])
  np.testing.assert_allclose(fsdp["losses"], one["assemble"]["losses"], rtol=2e-5)
  assert_same_params(fsdp, one["assemble"])


def test_scanned_blocks_under_fsdp_with_two_micro_batches_match_the_per_block_model_on_one_device(results):
  """Gradient accumulation over two micro-batches and the blocks scanned, both under FSDP on 8 devices: the full
  batch's step of the per-block model on one device."""
  one, eight = results
  scan = eight["plain/scan_accum2"]
  assert scan["stacked"] > 0 and not scan["block_axis_split"]
  assert any("data" in s for s in scan["specs"])
  np.testing.assert_allclose(scan["losses"], one["plain"]["losses"], rtol=2e-5)
  assert_same_params(scan, one["plain"])


@pytest.mark.parametrize("case, reference", [("moe/data", "moe"), ("moe/fsdp", "moe/capacity")])
def test_experts_split_over_eight_devices_match_one_device(case, reference, results):
  """Each of 8 devices holds one expert of each MoE layer, under data parallelism and FSDP alike (and with the
  blocks scanned), and the tokens go to them and back: the same losses and parameters as one device holding them
  all, with no assignment dropped by the reference's routing and the same ones dropped by a capacity."""
  one, eight = results
  got, want = eight[case], one[reference]
  assert want["expert_specs"] == ["P()"]
  split = ["P('data', None)", "P('data', None, None)"]
  assert got["expert_specs"] == (split if case == "moe/data" else ["P(None, 'data', None)",
                                                                    "P(None, 'data', None, None)"])
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=2e-5)
  assert_same_params(got, want)
  if "flops" in want:
    # The work counted is the same: the grouped matmuls inside the exchange, lowered per device, are counted as
    # the k experts of every token (modassem.cost), not as the padded buffers or every expert.
    assert got["flops"] == pytest.approx(want["flops"], rel=0.01)

"""Data-parallel training with 2 CPU processes (gloo) through torchrun: both ranks must
end with identical weights, and training must actually have changed them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("method", ["text", "amess"])
def test_two_process_training_keeps_ranks_in_sync(tmp_path, synth_dir, tiny_encoder_dir, method):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--standalone",
           str(Path(__file__).with_name("ddp_worker.py")), str(synth_dir), str(tiny_encoder_dir), str(report), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # Under heavy machine load a rank was seen to abort while the process group shut down
    # ("terminate called without an active exception"), after rank 0 had written its report;
    # that teardown abort is tolerated, any other failure is not.
    teardown_abort = "terminate called without an active exception" in proc.stderr and report.is_file()
    assert proc.returncode == 0 or teardown_abort, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["world_size"] == 2 and r["backend"] == "gloo"
    assert r["steps"] == 3
    assert r["moved"] > 0
    assert r["max_rank_diff"] == 0.0

"""Under transformers' tensor parallelism (torchrun, tp_plan="auto"; on the CPU with the gloo backend) each rank's cache holds
its own KV heads, and at a budget above the sequence every baseline cache equals dense token for token."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


def test_caches_equal_dense_under_tensor_parallelism(tmp_path):
    tiny_model("llama", enable=False, max_position_embeddings=1024).save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "model"), "600"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[0].removeprefix("RESULTS "))
    assert results["kv heads per rank"] == 1  # the tiny model's 2 KV heads, split over 2 ranks
    assert len(results["equal dense"]) == 4 and all(results["equal dense"].values()), results

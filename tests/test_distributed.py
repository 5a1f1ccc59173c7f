"""The trainer's distributed code (`mtplatform/distributed.py`) under torchrun, with two CPU processes (gloo).

`scripts/check_distributed.py` is also what runs on a GPU machine with nccl (README, "Many processes"); here it runs
as CI can: DDP and FSDP2 against one process, and FSDP's resume from its gathered state.
"""

import os
import subprocess
import sys

from conftest import REPO


def test_ddp_and_fsdp_match_one_process_and_fsdp_resumes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                          "scripts/check_distributed.py"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gloo, 2 process(es)" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 4 and all(line.startswith("  ok") for line in lines), out.stdout
    assert "check_distributed: all held" in out.stdout

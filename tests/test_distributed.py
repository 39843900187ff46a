"""minimodel.distributed.on_rank0 in a real two-process group (torchrun, gloo)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from adapt_helpers import REPO, launch_env
from minimodel.distributed import free_port

RANKS = textwrap.dedent("""
    import os
    from datetime import timedelta

    from minimodel import distributed
    from minimodel.training.preemption import Interrupted

    distributed.init_process_group(timeout=timedelta(seconds=60))
    rank = distributed.rank()

    def say(line):  # one write: the two ranks' lines never interleave on the shared pipe
        os.write(1, (line + "\\n").encode())

    try:  # rank 0 fails: every rank raises its error and goes on together (a per-language stage's next language)
        distributed.on_rank0(lambda: 1 / 0)
    except ZeroDivisionError as e:
        say(f"rank {rank} raised {type(e).__name__}")

    def stopped():  # a stop signal outside training on rank 0 (cli.run_stage ends every rank with exit 75)
        raise Interrupted("SIGUSR1")

    try:
        distributed.on_rank0(stopped)
    except Interrupted as e:
        say(f"rank {rank} raised {type(e).__name__}")
    ran = []
    value = distributed.on_rank0(lambda: ran.append(rank) or 7)
    say(f"rank {rank} got {value}, ran here: {bool(ran)}")
    distributed.destroy()
""")


def test_a_rank0_failure_reaches_every_rank_and_the_collectives_stay_in_step(tmp_path):
    """A rank-0 error inside a rank-0 block (selecting an SFT's values, saving a student) was raised on rank 0 alone,
    which went on to the next language while the others waited in a barrier: mismatched collectives, a hang under
    NCCL."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script)], cwd=REPO, env=launch_env(),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 got 7, ran here: True", "rank 0 raised Interrupted", "rank 0 raised ZeroDivisionError",
                     "rank 1 got 7, ran here: False", "rank 1 raised Interrupted", "rank 1 raised ZeroDivisionError"]

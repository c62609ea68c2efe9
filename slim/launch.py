"""Start the ranks of a multi-process hardware preset.

On one node, ``python -m slim.main hardware=cpu_x2`` re-runs itself under torchrun with one process per
rank, all sharing the run directory. Several nodes need the same command on each node: slim prints it
(with this node's rank filled in as a placeholder) and stops, as torchrun has to be started on every node.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from slim.config import HardwareConfig
from slim.errors import SlimError


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("hydra.run.dir=")]


def torchrun_args(hw: HardwareConfig, node_rank: str = "0", master_addr: str = "$MASTER_ADDR") -> list[str]:
    if hw.nodes == 1:
        return ["--standalone", f"--nproc-per-node={hw.procs_per_node}"]
    return [f"--nnodes={hw.nodes}", f"--nproc-per-node={hw.procs_per_node}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", "--master-port=29500"]


def needs_launch(hw: HardwareConfig) -> bool:
    return hw.nodes * hw.procs_per_node > 1 and "RANK" not in os.environ


def launch(hw: HardwareConfig, argv: list[str], run_dir: str) -> int:
    """Run the job under torchrun on this node; return its exit code. Raises for multi-node presets."""
    overrides = _user_overrides(argv) + [f"hydra.run.dir={run_dir}"]
    if hw.nodes > 1:
        cmd = ["torchrun", *torchrun_args(hw, node_rank="$NODE_RANK"), "-m", "slim.main", *overrides]
        raise SlimError(
            f"hardware={hw.name} spans {hw.nodes} nodes: start the job on every node with NODE_RANK=0..{hw.nodes - 1} "
            f"and MASTER_ADDR set to node 0 (hydra.run.dir must be on a shared filesystem):\n  "
            + " ".join(c if c.startswith("$") or "$" in c else shlex.quote(c) for c in cmd)
            + "\n(experiments/launch/torchrun_multinode.sh does this)"
        )
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(hw), "-m", "slim.main", *overrides]
    env = dict(os.environ)
    if hw.threads:
        env["OMP_NUM_THREADS"] = str(hw.threads)
    return subprocess.run(cmd, env=env).returncode

"""torchrun: two processes train through DistributedDataParallel and write one checkpoint."""

import os
import subprocess
import sys

from models import load_model
from stbir_train.config import load_config


def test_torchrun_two_processes_train_through_ddp_and_write_one_checkpoint(tiny_dataset, tmp_path,
                                                                           write_config):
    cfg_path = write_config(tiny_dataset, tmp_path, **{"training.batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "stbir_train.cli", "--config", str(cfg_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es) on cpu; gradients averaged by DistributedDataParallel (gloo)" in proc.stdout
    cfg = load_config(cfg_path)
    ckpts = sorted(p.name for p in (cfg.out / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "last.pt"]  # no per-rank copies, no stray temp files
    log = (cfg.out / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 1  # one epoch, written once (rank 0 only)
    model, _ = load_model(cfg.out / "checkpoints" / "last.pt")
    assert model.arcface is not None

"""Training on a CUDA device with autocast: the batches and the weights are on the GPU, the losses
stay finite, the weights move, and the checkpoint it writes loads on CPU (weights_only) and embeds
as the GPU model does. Skipped where torch sees no CUDA device."""

import json

import pytest
import torch
import torch.nn.functional as F

from models import load_model
from stbir_train import distributed
from stbir_train.config import load_config
from stbir_train.data import ImageCache
from stbir_train.evaluate import encode_rows
from stbir_train.manifest import manifest_paths, read_manifest_rows
from stbir_train.train import build_or_resume, prepare_data, run_stages, setup

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")


# With validation rows every epoch ends in evaluate_rows on the device (fusion pick, verification);
# without, the loop, autocast and the checkpoint are checked on their own.
@pytest.mark.parametrize("val_fraction", [0.15, 0.0], ids=["validation", "no-validation"])
def test_cuda_training_with_amp_writes_a_checkpoint_that_embeds_alike_on_cpu(
        tiny_dataset, tmp_path, write_config, monkeypatch, val_fraction):
    stages = [{"target": "all", "epochs": 2, "lr": 1e-3, "weight_decay": 0.01}]
    cfg = load_config(write_config(tiny_dataset, tmp_path, **{
        "model.preset": "tiny", "training.device": DEVICE, "training.amp": True,
        "training.stages": stages, "data.val_fraction": val_fraction}))
    seen = []  # (device of the batch, autocast on) at every training step
    real = distributed.step_losses

    def spy(model, batch, *args, **kwargs):
        seen.append((batch["image"].device.type, torch.is_autocast_enabled(DEVICE)))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(distributed, "step_losses", spy)
    lines = []
    run = setup(cfg, lines.append)  # train(), step by step, to keep the model it trained
    build_or_resume(run, None, prepare_data(run))
    before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run_stages(run, cfg.loss)

    assert run.procs.device.type == DEVICE
    assert any(f"1 process(es) on {run.procs.device}" in line for line in lines), lines
    assert len(seen) >= 4 and set(seen) == {(DEVICE, True)}, seen
    log = [json.loads(x) for x in (cfg.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for r in log for v in r["losses"].values()), log
    assert (log[0]["val"] is None) == (val_fraction == 0.0)
    frozen = [n for n, p in run.model.named_parameters()
              if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not frozen, f"trainable weights that did not move: {frozen}"
    assert all(v.device.type == DEVICE for v in run.model.state_dict().values())

    # The checkpoint: read on CPU by the project's loader (weights_only), the trained weights exactly.
    cpu_model, ckpt = load_model(cfg.out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2
    gpu_state = run.model.state_dict()
    assert all(v.device.type == "cpu" and torch.equal(v, gpu_state[k].cpu())
               for k, v in cpu_model.state_dict().items())

    # The same rows embedded in fp32 eval on both devices (the GPU may use TF32 convolutions).
    rows = read_manifest_rows(manifest_paths(cfg)["train"])[:16]
    cache = ImageCache(cfg.resolve(cfg.data.root))
    on_gpu = encode_rows(run.model, rows, cache, device=run.procs.device)
    on_cpu = encode_rows(cpu_model, rows, cache)
    for key in ("gallery", "sketch", "text"):
        cos = F.cosine_similarity(on_gpu[key], on_cpu[key]).min().item()
        assert cos >= 0.999, f"{key}: min cosine CPU vs {DEVICE} {cos:.6f}"

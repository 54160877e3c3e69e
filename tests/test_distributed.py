"""Data parallelism on CPU with gloo: 2 ranks x batch 2 == 1 process x batch 4; sharding; batch checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hagan.cli.commands import main
from hagan.config import build_config
from hagan.data.augment import VolumeAugment
from hagan.data.dataset import CachedVolumeDataset, infinite_loader
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.training.distributed import DistContext
from hagan.training.trainer import Trainer

TINY = {"size": 32, "width": 0.125, "latent_dim": 16}
CONFIGS = {
    # compared with one process: R1 (double backward through both discriminators), encoders, random r
    "exact": [{"hagan": {"r1_gamma": 1.0}}],
    # per-rank DiffAugment streams, ADA fed with the gathered logits, WGAN-GP: ranks must stay identical
    "streams": [{"hagan": {"loss": "wgan-gp", "diffaug": "translation,cutout,brightness,contrast",
                           "ada_target": 0.6, "ada_kimg": 0.001}}],
}
GLOBAL_BATCH = 4


def tiny_model(overrides, sgd=False):
    """With ``sgd`` the four optimizers are plain SGD, whose update is linear in the gradient: Adam's
    first step is lr * g / (|g| + eps), about lr * sign(g), which turns the rounding noise of gradients
    that are exactly 0 in exact arithmetic (conv biases in front of one-channel GroupNorm groups) into
    +-lr on either side and so cannot be compared with allclose."""
    config = build_config(None, None, [{"model": TINY}, *overrides])
    torch.manual_seed(0)
    model = build_model(config)
    if sgd:
        model._optimizers = {name: torch.optim.SGD([p for g in opt.param_groups for p in g["params"]], lr=0.05)
                             for name, opt in model.optimizers().items()}
    return model


def global_batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(GLOBAL_BATCH, 1, 32, 32, 32, generator=g) * 2 - 1,
            "label": torch.full((GLOBAL_BATCH,), -1)}


def state_of(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = DistContext(rank, world, rank)
    try:
        for name, overrides in CONFIGS.items():
            model = tiny_model(overrides, sgd=True)
            model.dist = ctx
            ctx.broadcast_module(model)
            local = GLOBAL_BATCH // world
            shard = {k: v[rank * local : (rank + 1) * local] for k, v in global_batch().items()}
            logs = model.train_step(shard, 0, torch.Generator().manual_seed(0))
            ctx.broadcast_module(model, buffers_only=True)
            save_file(state_of(model), str(Path(out_dir) / f"{name}_rank{rank}.safetensors"))
            (Path(out_dir) / f"{name}_rank{rank}.json").write_text(json.dumps({k: float(v) for k, v in logs.items()}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_batch_2_match_one_process_of_batch_4(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = {name: load_file(str(tmp_path / f"{name}_rank0.safetensors")) for name in CONFIGS}
    rank1 = {name: load_file(str(tmp_path / f"{name}_rank1.safetensors")) for name in CONFIGS}
    for name in CONFIGS:  # every parameter and buffer (spectral norm's _u, _v included) identical on the ranks
        assert rank0[name].keys() == rank1[name].keys()
        for key in rank0[name]:
            assert torch.equal(rank0[name][key], rank1[name][key]), (name, key)
    assert any("_u" in key for key in rank0["exact"])

    model = tiny_model(CONFIGS["exact"], sgd=True)
    before = state_of(model)
    model.train_step(global_batch(), 0, torch.Generator().manual_seed(0))
    after = state_of(model)
    worst, scale = 0.0, 0.0
    for key, value in after.items():
        if value.is_floating_point():
            update, update_2 = value - before[key], rank0["exact"][key] - before[key]
            # atol: float32 rounding of parameters of magnitude ~1 (GroupNorm scales) is 6e-8 per step
            assert torch.allclose(update_2, update, rtol=1e-3, atol=1e-6), (key, float((update_2 - update).abs().max()))
            worst = max(worst, float((update_2 - update).abs().max()))
            scale = max(scale, float(update.abs().max()))
    if os.environ.get("HAGAN_DDP_REPORT"):
        Path(os.environ["HAGAN_DDP_REPORT"]).write_text(json.dumps({"max_abs_diff": worst, "max_update": scale}))
    print(f"largest |update(2 ranks) - update(1 process)|: {worst:.3g} (largest update {scale:.3g})")


def test_loader_shards_the_global_batch_with_the_same_augmentation(tiny_ct_cache):
    def loader(rank, world):
        dataset = CachedVolumeDataset(tiny_ct_cache, transform=VolumeAugment(seed=3))
        return infinite_loader(dataset, 4, seed=5, rank=rank, world_size=world)

    single, shards = loader(0, 1), [loader(r, 2) for r in range(2)]
    for _ in range(3):  # crosses an epoch boundary (5 items, batch 4: one batch per epoch)
        whole = next(single)
        parts = [next(s) for s in shards]
        assert torch.cat([p["index"] for p in parts]).tolist() == whole["index"].tolist()
        assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"])
    assert shards[0].state_dict() == single.state_dict()


def test_batch_size_that_does_not_divide_is_refused_before_any_work(tiny_ct_cache, tmp_path, monkeypatch, capsys):
    config = build_config(None, None, [{"model": TINY}, {"optim": {"batch_size": 3}}, {"data": {"cache": str(tiny_ct_cache)}}])
    with pytest.raises(HaganError, match="optim.batch_size 3 does not divide across 2 processes"):
        Trainer(config, tmp_path / "run", dist=DistContext(rank=0, world_size=2))
    assert not (tmp_path / "run").exists()
    with pytest.raises(HaganError, match="does not divide across 2 processes"):
        infinite_loader(CachedVolumeDataset(tiny_ct_cache), 3, seed=0, rank=0, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(tiny_ct_cache), "--out", str(tmp_path / "cli"), "--size", "32", "--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "does not divide across 2 processes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(tiny_ct_cache, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hagan.cli", "train", "--data", str(tiny_ct_cache), "--out", str(run), "--size", "32", "--iterations", "3",
           "--batch-size", "4", "--device", "cpu", "--set", "model.width=0.125", "--set", "model.latent_dim=16",
           "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run written to") == 1  # rank 0 only
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_00000002", "iter_00000003"]
    state = json.loads((run / "checkpoints" / "iter_00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["loader"]["batch_size"] == 4
    lines = [json.loads(line)["iteration"] for line in (run / "scalars.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3]

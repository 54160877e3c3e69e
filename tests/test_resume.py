"""Exact resume, SIGTERM, SIGKILL at random moments, divergence stop and rollback."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hagan.config import build_config
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.run_folder import list_checkpoints, read_scalars
from hagan.training.checkpoint import TMP_PREFIX, TRASH_PREFIX, load_checkpoint
from hagan.training.trainer import Trainer, train

TINY = {"size": 32, "width": 0.125, "latent_dim": 16}
# a run that exercises every random stream: volume augmentation, DiffAugment with ADA, random r
STREAMS = {
    "hagan": {"diffaug": "translation,cutout,brightness,contrast", "ada_target": 0.6, "ada_kimg": 0.002},
    "data": {"augment": True},
}


def config_for(tiny_ct_cache, iterations, **train_changes):
    train_cfg = {"iterations": iterations, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000,
                 "deterministic": True, **train_changes}
    return build_config(None, None, [{"model": TINY}, STREAMS, {"optim": {"batch_size": 2}},
                                     {"data": {"cache": str(tiny_ct_cache)}}, {"train": train_cfg}])


def final_weights(run_dir):
    return load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "weights.safetensors"))


def test_resume_is_exact(tiny_ct_cache, tmp_path):
    """2 iterations straight == 1 + resume + 1 (mid-epoch: 5 items, batch 2), bitwise, with every stream on."""
    train(config_for(tiny_ct_cache, 2), tmp_path / "straight", progress=False)
    train(config_for(tiny_ct_cache, 1, checkpoint_every=1), tmp_path / "split", progress=False)
    state = json.loads((tmp_path / "split" / "checkpoints" / "iter_00000001" / "state.json").read_text())
    assert state["loader"] == {"seed": 0, "epoch": 0, "position": 1, "batch_size": 2}
    assert state["extra"]["augment"]["updates"] == 1
    train(config_for(tiny_ct_cache, 2, checkpoint_every=1), tmp_path / "split", resume=True, progress=False)
    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
    assert [i for i, _ in read_scalars(tmp_path / "split")["loss/D_adv"]] == [1, 2]
    assert read_scalars(tmp_path / "straight") .keys() == read_scalars(tmp_path / "split").keys()
    for key, values in read_scalars(tmp_path / "straight").items():
        if not key.startswith("speed/"):
            assert values == read_scalars(tmp_path / "split")[key], key


def poison_at(trainer, iterations):
    """Make the batch of the given (0-based) iterations NaN, once each."""
    original, pending = trainer.model.train_step, set(iterations)

    def step(batch, iteration, rng):
        if iteration in pending:
            pending.discard(iteration)
            batch = {**batch, "image": batch["image"] * float("nan")}
        return original(batch, iteration, rng)

    trainer.model.train_step = step


def test_divergence_stops_naming_iteration_and_loss(tiny_ct_cache, tmp_path):
    trainer = Trainer(config_for(tiny_ct_cache, 1), tmp_path / "run", progress=False)
    poison_at(trainer, {0})
    with pytest.raises(HaganError, match=r"training diverged at iteration 1: non-finite loss in the D step \(loss/D = nan\)"):
        trainer.fit()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_divergence_between_log_points_is_named_at_its_own_iteration(tiny_ct_cache, tmp_path):
    """Finiteness is read back every train.log_every iterations; the record names where it began, and the
    weights never took a non-finite step, so the run stops before writing any checkpoint."""
    trainer = Trainer(config_for(tiny_ct_cache, 6, log_every=3), tmp_path / "run", progress=False)
    poison_at(trainer, {1})
    with pytest.raises(HaganError, match=r"training diverged at iteration 2: non-finite loss in the D step "
                                         r"\(loss/D = nan\) \(read back at iteration 3; no update with a non-finite"):
        trainer.fit()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_divergence_rolls_back_with_lower_learning_rates(tiny_ct_cache, tmp_path, capsys):
    cfg = config_for(tiny_ct_cache, 3, checkpoint_every=1, on_divergence="rollback", rollback_lr_factor=0.5, max_rollbacks=2)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    poison_at(trainer, {0, 2})  # before any checkpoint (back to the start), then after iteration 2's
    trainer.fit()
    err = capsys.readouterr().err
    assert "iteration 1: non-finite loss in the D step (loss/D = nan); rolled back to the start (iteration 0) " \
           "with the learning rates x0.5" in err
    assert "iteration 3: non-finite loss in the D step (loss/D = nan); rolled back to iter_00000002 " \
           "with the learning rates x0.25" in err
    assert trainer.optimizers["G"].param_groups[0]["lr"] == pytest.approx(cfg.optim.lr_g * 0.25)
    state = json.loads((list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "state.json").read_text())
    assert (state["iteration"], state["rollbacks"], state["lr_scale"]) == (3, 2, 0.25)
    assert [i for i, _ in read_scalars(tmp_path / "run")["loss/D"]] == [1, 2, 3]
    # a third divergence exceeds train.max_rollbacks = 2
    trainer = Trainer(config_for(tiny_ct_cache, 5, on_divergence="rollback", max_rollbacks=2), tmp_path / "run", resume=True,
                      progress=False)
    poison_at(trainer, {3})
    with pytest.raises(HaganError, match=r"iteration 4: .*gave up after 2 rollback\(s\)"):
        trainer.fit()


def cli(tiny_ct_cache, out, iterations, *extra):
    return [sys.executable, "-m", "hagan.cli", "train", "--data", str(tiny_ct_cache), "--out", str(out), "--size", "32",
            "--iterations", str(iterations), "--batch-size", "2", "--set", "model.width=0.125",
            "--set", "model.latent_dim=16", "--set", "train.log_every=1", "--set", "train.sample_every=100000",
            "--set", "train.deterministic=true", *extra]


def wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def latest_iteration(run):
    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name.split("_")[1]) if found else -1


def kill_and_resume(tiny_ct_cache, tmp_path, kills, seed, finish):
    """SIGKILL a training subprocess at random moments (a checkpoint every iteration, so saves are
    always in flight); after each kill the latest checkpoint must load in full and the run resume.
    ``finish``: "sigterm" ends with SIGTERM (clean exit, checkpoint at the stop); "complete" runs to
    the end and compares with a run that was never interrupted."""
    run = tmp_path / "run"
    draw = random.Random(seed)
    records = []
    resume = [sys.executable, "-m", "hagan.cli", "train", "--out", str(run), "--resume", "--iterations"]
    for k in range(kills + (finish == "sigterm")):
        before = latest_iteration(run)
        extra = ["--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2"]
        args = cli(tiny_ct_cache, run, 100000, *extra) if k == 0 else resume + ["100000"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: latest_iteration(run) > before, proc)
        if k == kills:  # the SIGTERM leg
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            stopped = int(out.split("stopped by a signal at iteration ")[1].split(";")[0])
            assert latest_iteration(run) == stopped
            assert [i for i, _ in read_scalars(run)["loss/D"]] == list(range(1, stopped + 1))
            break
        delay = draw.uniform(0.0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        folder = run / "checkpoints"
        leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)))
        latest = list_checkpoints(folder)[-1]
        config = build_config(None, run / "config.yaml")
        model = build_model(config)
        state = load_checkpoint(latest, model, model.optimizers(), torch.Generator())
        assert state["iteration"] == int(latest.name.split("_")[1])
        records.append({"delay_s": round(delay, 3), "latest": state["iteration"], "leftovers": leftovers})
    if finish == "complete":
        target = latest_iteration(run) + 2
        done = subprocess.run(resume + [str(target)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
        assert [i for i, _ in read_scalars(run)["loss/D"]] == list(range(1, target + 1))
        reference = tmp_path / "reference"
        train(build_config(None, run / "config.yaml", [{"train": {"iterations": target}}]), reference, progress=False)
        a, b = final_weights(run), final_weights(reference)
        assert all(torch.equal(a[k], b[k]) for k in a)
    return records


def test_sigkill_at_random_moments_then_sigterm(tiny_ct_cache, tmp_path):
    """Two SIGKILLs at random moments, each followed by a full load of the latest checkpoint and a
    resume; then SIGTERM, which must save and exit with status 0."""
    records = kill_and_resume(tiny_ct_cache, tmp_path, kills=2, seed=int(os.environ.get("HAGAN_KILL_SEED", "0")),
                              finish="sigterm")
    assert len(records) == 2


@pytest.mark.slow
def test_sigkill_many_kill_points(tiny_ct_cache, tmp_path):
    kills = int(os.environ.get("HAGAN_KILLS", "20"))
    records = kill_and_resume(tiny_ct_cache, tmp_path, kills=kills, seed=int(os.environ.get("HAGAN_KILL_SEED", "1")),
                              finish="complete")
    report = Path(os.environ.get("HAGAN_KILL_REPORT", tmp_path / "kills.json"))
    report.write_text(json.dumps(records, indent=1))


def test_a_rollback_when_a_signal_stops_the_run_is_saved(tiny_ct_cache, tmp_path, capsys):
    """A non-finite update found only at the stop (SIGTERM between two log points): the rollback's count and
    lowered rates reach a checkpoint, so --resume goes on at the lowered rates."""
    cfg = config_for(tiny_ct_cache, 10, log_every=100, checkpoint_every=2, on_divergence="rollback", max_rollbacks=3)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    original = trainer.model.train_step

    def step(batch, iteration, rng):
        if iteration == 2:
            batch = {**batch, "image": batch["image"] * float("nan")}
            out = original(batch, iteration, rng)
            os.kill(os.getpid(), signal.SIGTERM)
            return out
        return original(batch, iteration, rng)

    trainer.model.train_step = step
    trainer.fit()
    assert "rolled back to iter_00000002 with the learning rates x0.5" in capsys.readouterr().err
    state = json.loads((list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "state.json").read_text())
    assert (state["iteration"], state["rollbacks"], state["lr_scale"]) == (2, 1, 0.5)
    resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed.optimizers["G"].param_groups[0]["lr"] == pytest.approx(cfg.optim.lr_g * 0.5)

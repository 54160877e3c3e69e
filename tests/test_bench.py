"""hagan bench: rows with the expected keys and positive numbers, parameter counts as `hagan summary`,
every registered model measured, status rows instead of crashes for configurations that do not fit and
models that are not there, and readable JSON and PNG output."""

import json

import matplotlib.image
import pytest

from hagan.cli.commands import main as cli_main
from hagan.evaluation import bench
from hagan.evaluation.bench import (
    ROW_KEYS,
    bench_config,
    estimate_memory,
    meta_model,
    param_counts,
    run_bench,
    save_bench,
)
from hagan.models import MODELS
from hagan.models.baselines.model import Baseline

TINY = dict(sizes=[32], batch_sizes=[2], width=0.125, config_overrides=[{"model": {"latent_dim": 16}}],
            iterations=1, warmup=1, device="cpu", progress=False, threads=1, max_seconds=300)
POSITIVE = ("train_it_per_s", "train_seconds_per_it", "train_peak_mem_bytes", "gen_seconds_per_volume",
            "gen_peak_mem_bytes", "flops_per_iteration", "tflops", "gen_flops_per_volume", "gen_tflops",
            "params_total")


def check_row(row, model="hagan"):
    assert set(ROW_KEYS) <= set(row), set(ROW_KEYS) - set(row)
    assert row["status"] == "ok", row
    assert (row["model"], row["size"], row["batch"], row["width"], row["dtype"]) == (model, 32, 2, 0.125, "float32")
    for key in POSITIVE:
        assert row[key] > 0, key
    assert row["train_it_per_s"] == pytest.approx(1 / row["train_seconds_per_it"])
    assert row["tflops"] == pytest.approx(row["flops_per_iteration"] * row["train_it_per_s"] / 1e12)
    assert row["device_name"] and row["torch"]


@pytest.fixture(scope="module")
def rows():
    return run_bench(isolate=False, **TINY)


def test_in_process_row_has_every_key_and_positive_numbers(rows):
    assert len(rows) == 1
    check_row(rows[0])
    config = bench_config("hagan", 32, 2, 0.125, "cpu", TINY["config_overrides"])
    counts = param_counts(config)
    assert rows[0]["params_total"] == counts["total"] == sum(rows[0]["params"].values())
    assert set(rows[0]["params"]) == {"G_A", "G_L", "G_H", "D_H", "D_L", "E_H", "E_G"}


def test_isolated_run_measures_in_fresh_children_and_reports_idle_baseline():
    row, = run_bench(isolate=True, **TINY)
    check_row(row)
    assert row["isolated"] is True and row["mem_kind"] == "peak_rss"
    assert 0 < row["idle_rss_bytes"] <= row["train_peak_mem_bytes"]


def test_parameter_counts_match_hagan_summary(capsys):
    assert cli_main(["summary", "--size", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert param_counts(bench_config("hagan", 32, 4, 1.0, "cpu")) == summary


def test_memory_guard_gives_a_status_row_instead_of_raising():
    row, = run_bench(isolate=False, memory_limit_bytes=1, **{k: v for k, v in TINY.items()})
    assert row["status"].startswith("skipped: predicted") and row["train_status"].startswith("skipped")
    assert row["gen_status"].startswith("skipped") and row["train_it_per_s"] is None
    assert row["params_total"] > 0


def test_512_cube_is_refused_by_the_guard_not_run():
    # 512^3 is predicted far above 4 GiB even at a quarter of the paper's channels
    row, = run_bench(isolate=False, sizes=[512], batch_sizes=[2], device="cpu", progress=False, width=0.25,
                     memory_limit_bytes=4 * 2**30)
    assert row["estimated_train_mem_bytes"] > 4 * 2**30
    assert row["train_status"].startswith("skipped: predicted")


def test_time_limit_gives_a_status_row(monkeypatch):
    row, = run_bench(isolate=False, **{**TINY, "max_seconds": 1e-6})
    assert row["train_status"].startswith("skipped: time limit"), row
    assert row["status"].startswith("skipped: time limit")


def test_out_of_memory_and_child_failures_become_status_rows(monkeypatch):
    def boom(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(bench, "_measure_train", boom)
    monkeypatch.setattr(bench, "_measure_generate", boom)
    row, = run_bench(isolate=False, **TINY)
    assert row["status"] == "out of memory" and row["gen_status"] == "out of memory"


def test_unknown_model_is_a_row():
    row, = run_bench(models=["nope"], **{k: v for k, v in TINY.items()})
    assert row["status"].startswith("skipped: unknown model")


BASELINES = ("wgan-gp", "alpha-gan", "vae-gan")


def test_every_baseline_is_measured_with_parameters_per_network_and_counted_flops():
    # the gradient-penalty critics differentiate twice: FLOPs must still be counted (checked positive)
    rows = run_bench(models=BASELINES, isolate=False, **{k: v for k, v in TINY.items()})
    for name, row in zip(BASELINES, rows):
        check_row(row, name)
        children = dict(meta_model(bench_config(name, 32, 2, 0.125, "cpu", TINY["config_overrides"])).named_children())
        assert row["params"] == {k: sum(p.numel() for p in m.parameters()) for k, m in children.items()}
        assert 0 < row["estimated_train_mem_bytes"] and 0 < row["estimated_gen_mem_bytes"]


def test_registered_model_without_its_module_is_a_row(monkeypatch):
    monkeypatch.setitem(MODELS, "ghost", "hagan.models.ghost:GhostGAN")
    row, = run_bench(models=["ghost"], **{k: v for k, v in TINY.items()})
    assert row["status"].startswith("skipped: model not available (hagan.models.ghost:GhostGAN")


def test_model_that_cannot_be_built_at_a_size_is_a_row(monkeypatch):
    def refuse(config):
        raise ValueError(f"no {config.model.size}^3 variant")

    monkeypatch.setattr(bench, "meta_model", refuse)
    row, = run_bench(models=["wgan-gp"], isolate=False, **{k: v for k, v in TINY.items()})
    assert row["status"] == "skipped: cannot build wgan-gp at 32^3 (ValueError: no 32^3 variant)"
    assert "32^3 batch 2: skipped" in bench.format_row(row)


def test_baseline_estimate_grows_and_a_model_without_probes_is_measured_unguarded(monkeypatch):
    small = estimate_memory(bench_config("alpha-gan", 32, 2, 0.25, "cpu"))
    large = estimate_memory(bench_config("alpha-gan", 64, 4, 0.25, "cpu"), generate_batch=2)
    assert small["train"] < large["train"] and small["generate"] < large["generate"]
    monkeypatch.delattr(Baseline, "memory_probes")
    assert estimate_memory(bench_config("alpha-gan", 32, 2, 0.25, "cpu"))["train"] is None
    row, = run_bench(models=["wgan-gp"], isolate=False, memory_limit_bytes=1, **{k: v for k, v in TINY.items()})
    assert row["estimated_train_mem_bytes"] is None and row["train_status"] == "ok"
    assert row["gen_status"].startswith("skipped: predicted")


def test_estimate_grows_with_size_and_batch():
    small = estimate_memory(bench_config("hagan", 32, 2, 0.25, "cpu"))
    shapes = meta_model(bench_config("hagan", 128, 2, 0.25, "cpu"))  # the networks do not depend on the batch
    b2 = estimate_memory(bench_config("hagan", 128, 2, 0.25, "cpu"), model=shapes)
    b4 = estimate_memory(bench_config("hagan", 128, 4, 0.25, "cpu"), generate_batch=2, model=shapes)
    assert small["train"] < b2["train"] < b4["train"]
    assert small["generate"] < b2["generate"] < b4["generate"]


def test_save_bench_writes_readable_json_and_png(rows, tmp_path):
    skipped = {**rows[0], "size": 64, "status": "out of memory", "train_it_per_s": None,
               "train_peak_mem_bytes": None}
    json_path, png_path = save_bench([*rows, skipped], tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["train_it_per_s"] == rows[0]["train_it_per_s"]
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.png"]  # no temporaries

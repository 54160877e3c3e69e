"""The small-data protocol (experiments/quality.py) end to end on brain phantoms: split, train, score, report."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from hagan.data.phantoms import write_phantom_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "quality.py"
TINY = ["--size", "32", "--width", "0.125", "--latent-dim", "16", "--batch-size", "2", "--samples", "6",
        "--validation-heads", "4"]


def run_protocol(*argv):
    saved = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    from test_end_to_end import require_deepbet

    require_deepbet()
    root = tmp_path_factory.mktemp("quality")
    write_phantom_dataset(root / "heads", kind="brain-mri", n=12, size=32, seed=0)
    out = root / "out"
    data = ["--data", str(root / "heads"), "--out", str(out), *TINY]
    for config in ("paper", "small-data"):
        run_protocol("train", *data, "--config", config, "--iterations", "2", "--checkpoint-every", "1")
    run_protocol("calibrate", *data)
    run_protocol("cost", *data, "--steps", "1")
    run_protocol("report", "--out", str(out), *TINY, "--iterations", "1")
    return out


def test_the_split_holds_the_validation_heads_out(protocol):
    assert len(list((protocol / "cache-32-val" / "volumes").glob("*"))) == 4
    assert len(list((protocol / "cache-32-train" / "volumes").glob("*"))) == 8


def test_every_checkpoint_is_scored_from_both_weights_where_there_are_two(protocol):
    for name in ("paper", "small-data"):
        result = json.loads((protocol / "runs" / f"{name}-seed0" / "results.json").read_text())
        assert set(result["checkpoints"]) == {"1", "2"}
        for scores in result["checkpoints"].values():
            for weights in ("ema", "raw"):
                assert scores[weights]["kid_val"] == pytest.approx(scores[weights]["kid_val"])  # not NaN
                assert scores[weights]["nn_ratio"] > 0 and scores[weights]["diversity"] >= 0
        assert result["preset_samples_from"] == ("raw" if name == "paper" else "ema")
        mismatch = [s["slab_mismatch"] for s in result["checkpoints"].values()]
        assert all(m > 0.01 for m in mismatch) if name == "paper" else all(m < 1e-5 for m in mismatch)


def test_calibration_cost_and_report_are_written(protocol):
    calibration = json.loads((protocol / "calibration-32.json").read_text())
    assert calibration["1 distinct training heads"]["diversity"] == 0
    assert calibration["4 distinct training heads"]["diversity"] > 0
    assert "training heads blurred (sigma 2.0 voxels)" in calibration
    cost = json.loads((protocol / "cost-32.json").read_text())
    assert cost["rows"]["paper"]["ratio_to_first"] == 1 and cost["rows"]["small-data"]["seconds_per_iteration"] > 0
    report = (protocol / "report.md").read_text()
    assert "| small-data | 0 | 1 |" in report and "| small-data | 0 | 2 |" in report
    assert (protocol / "curves.png").stat().st_size > 0 and (protocol / "side-by-side.png").stat().st_size > 0

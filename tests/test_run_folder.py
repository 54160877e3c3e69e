"""The run folder module: importable without torch."""

import os
import subprocess
import sys
from pathlib import Path

from hagan.run_folder import iteration_name


def test_importing_the_run_folder_module_does_not_import_torch():
    code = "import sys, hagan.run_folder; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


def test_checkpoint_folders_and_sample_montages_sort_by_iteration():
    assert iteration_name(7) == "iter_00000007"
    assert sorted(iteration_name(i) for i in (10, 9, 100)) == [iteration_name(i) for i in (9, 10, 100)]


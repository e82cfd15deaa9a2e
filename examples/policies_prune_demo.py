"""A real run for the prune --dry-run table: 100 steps, a save every 4, an LR change at step 61.

    PYTHONPATH=src python examples/policies_prune_demo.py
    python -m ckptguard.cli pin /tmp/prune-demo/run 32 --note "eval baseline"
    COLUMNS=120 python -m ckptguard.cli prune /tmp/prune-demo/run --dry-run --keep-last 3 --phased --total-steps 100
"""
import shutil
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "tests"))
import trainlib

import ckptguard as cg

run = "/tmp/prune-demo/run"
shutil.rmtree("/tmp/prune-demo", ignore_errors=True)
def hook(step, s):
    if step == 61:
        s["state"].config = {"lr": 5e-3, "hidden": 32}   # LR change mid-run
trainlib.run_training(run, 100, every_steps=4, on_step=hook,
                      manager_kwargs={"retention": cg.Retention(keep_best=1, metric="loss", keep_config_changes=True)})

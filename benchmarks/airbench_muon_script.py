"""airbench94_muon.py (KellerJordan/cifar10-airbench, a script, not in the airbench package) as
a contestant of time_to_accuracy.py: imported from the file the user gives, run as its own
``__main__`` runs it (one compiled CifarNet reused by every run), its printed rows captured.

The script reads ``cifar10/train.pt`` and ``test.pt`` relative to the working folder, as
airbench does; time_to_accuracy.py writes them and runs this from their folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hooktrain.errors import HooktrainError

MUON = "airbench94_muon.py"
MUON_TIME_NOTE = (
    "airbench94_muon.py: training seconds are the script's own time_seconds (CUDA events): "
    "whitening initialisation, the training epochs and the final test-time-augmented "
    "evaluation; its first run is its own warm-up (random labels), which compiles its "
    "network with mode='max-autotune'. Accuracy: its final TTA accuracy."
)
_COLUMNS = ("epoch", "train_acc", "val_acc", "tta_val_acc", "time_seconds")


def load_muon_script(path: Path) -> ModuleType:
    """The script as a module, refused in a sentence when it is not the one this expects."""
    if not path.is_file():
        raise HooktrainError(
            f"--airbench-muon {path} does not exist; give the path of airbench94_muon.py from "
            "KellerJordan/cifar10-airbench (commit 096d14d)."
        )
    spec = importlib.util.spec_from_file_location("airbench94_muon", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved_argv, benchmark_flag = sys.argv[:], torch.backends.cudnn.benchmark
    sys.argv[0] = str(path)  # the script reads its own source from sys.argv[0] on import
    try:
        spec.loader.exec_module(module)
    finally:
        # It turns cudnn.benchmark on for the process on import; only its own runs get it.
        sys.argv[:], torch.backends.cudnn.benchmark = saved_argv, benchmark_flag
    if not all(hasattr(module, name) for name in ("main", "CifarNet", "print_training_details")):
        raise HooktrainError(
            f"{path} has no main, CifarNet or print_training_details; this benchmark was "
            "written for airbench94_muon.py at KellerJordan/cifar10-airbench commit 096d14d."
        )
    return module


class MuonContestant:
    """One compiled network, warmed up once, then one call of the script's ``main`` per seed."""

    def __init__(self, module: ModuleType, data_root: Path) -> None:
        self.module, self.data_root = module, data_root
        self.model: Any = None

    def run(self, seed: int, warmup: bool) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        original = self.module.print_training_details

        def capture(variables: dict[str, Any], is_final_entry: bool) -> None:
            rows.append({key: variables.get(key) for key in _COLUMNS})
            original(variables, is_final_entry)

        printed = io.StringIO()
        self.module.print_training_details = capture
        benchmark_flag = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with contextlib.chdir(self.data_root), contextlib.redirect_stdout(printed):
                started = time.perf_counter()
                if self.model is None:
                    model = self.module.CifarNet().cuda().to(memory_format=torch.channels_last)
                    model.compile(mode="max-autotune")
                    self.model = model
                torch.manual_seed(seed)
                accuracy = self.module.main("warmup" if warmup else seed, self.model)
                torch.cuda.synchronize()
                call_seconds = time.perf_counter() - started
        finally:
            self.module.print_training_details = original
            torch.backends.cudnn.benchmark = benchmark_flag
        final = next((row for row in rows if row["epoch"] == "eval"), None)
        if final is None:
            raise HooktrainError(
                f"{MUON} printed no final evaluation row. Its output was:\n{printed.getvalue()}"
            )
        return {
            "seed": seed,
            "test_accuracy": accuracy,
            "train_seconds": final["time_seconds"],
            "call_seconds": call_seconds,
            "epochs": [row for row in rows if row["epoch"] != "eval"],
            "log": printed.getvalue(),
        }

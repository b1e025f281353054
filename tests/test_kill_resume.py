"""Kill and resume, the short version of ``tests/fault_kill_resume.py`` (which see; run it with
``--trials 20`` for the full one): a run SIGKILLed three times, at least once inside a
checkpoint write, and resumed each time ends bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

from fault_kill_resume import CHECKPOINTS, Options, run_trials


def test_killed_and_resumed_run_is_bit_identical(tiny_cifar: Path, tmp_path: Path) -> None:
    # 240 images, 200 trained on in batches of 20: 2 epochs of 10 steps, a save every 3 steps.
    options = Options(
        kills_per_trial=3, write_share=0.5, any_temp_share=0.0, settings=("train_limit=200",)
    )
    # With seed 4 the kills go: at a random moment of the first run (which lives long enough
    # for it to land), then twice inside a checkpoint write.
    summary = run_trials(1, tiny_cifar, tmp_path, rng_seed=4, options=options, echo=print)
    report = summary.text()
    (trial,) = summary.trials
    assert not trial.failures, report
    assert trial.matched, report
    assert trial.best_matched, report
    assert trial.kills >= 2, report
    assert trial.kills_in_write >= 1, report
    assert not list((trial.run_dir / CHECKPOINTS).glob(".*.tmp")), report
    assert summary.ok, report

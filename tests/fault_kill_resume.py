"""Kill and resume: SIGKILL a training run at random moments, resume it, repeat; the end state
must be bit-identical to an uninterrupted run with the same seed.

Each trial starts a small run (``hooktrain run`` in a subprocess, in its own folder) and kills it
with SIGKILL, then continues it with ``hooktrain resume`` (or ``hooktrain run --out`` again when
the kill came before ``config.json`` existed) and kills that too, a few times, before letting it
finish. About half of the kills are timed at random; the others wait for a checkpoint temp file
(``checkpoints/.*.tmp``) to appear and kill at that moment, so that they land inside a write.
The final ``checkpoints/last.pt`` state (step, epoch, parameters, buffers, optimizer state, RNG
states) is compared bit for bit with that of one uninterrupted reference run, and so is
``best.pt``.

    python tests/fault_kill_resume.py --trials 20           # the full version
    python tests/fault_kill_resume.py --trials 2 --seed 7   # a quick one

Without ``--data-dir`` a tiny data set in the official CIFAR-10 format (random pixels) is made in
the work folder. The exit status is 1 when any trial ended with a different state, a failure
(a process that exited non-zero without being killed) or a temp file left in checkpoints/.
``tests/test_kill_resume.py`` runs a short version of this.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE = "resnet9_cifar10"
SETTINGS = (
    "model.width=4",
    "epochs=2",
    "train_limit=400",
    "batch_size=20",
    "checkpoint.every_steps=3",
    "metrics.progress=false",
    "metrics.tensorboard=false",
)
TRAIN_SEED = 0
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
# Every temp file hooktrain writes: `.NAME.XXXXXXXX.tmp` (atomic_write) and `.NAME.link.tmp`.
TEMP = re.compile(r"^\..+\.tmp$")
# The temp files of atomic_write alone: a save is in progress for as long as one exists.
SAVE_TEMP = re.compile(r"^\.[\w.]+\.pt\.[a-z0-9_]{8}\.tmp$")
KILLED = -signal.SIGKILL
# A process not killed on purpose must end within this many reference-run durations.
PATIENCE = 10.0


@dataclass
class Trial:
    """What happened in one trial."""

    index: int
    run_dir: Path
    kills: int = 0  # SIGKILLs that reached a live process
    kills_in_write: int = 0  # ... that left a checkpoint temp file (killed inside a write)
    kills_before_config: int = 0  # ... that came before config.json existed
    aimed_at_writes: int = 0  # kill attempts that waited for a temp file
    resumes: int = 0  # `hooktrain resume` processes started
    restarts: int = 0  # `hooktrain run --out` again after a kill before config.json
    matched: bool = False  # last.pt's state equals the reference's
    best_matched: bool = False  # best.pt's state equals the reference's
    mismatches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # unexpected exits, with their stderr
    stale_temp_files: list[str] = field(default_factory=list)  # in checkpoints/, at the end
    run_folder_temp_files: list[str] = field(default_factory=list)  # beside config.json
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.matched and self.best_matched and not self.failures and not self.stale_temp_files
        )


@dataclass
class Summary:
    """All trials, and the reference run's timings."""

    trials: list[Trial]
    reference_seconds: float
    reference_config_seconds: float

    @property
    def kills(self) -> int:
        return sum(trial.kills for trial in self.trials)

    @property
    def kills_survived(self) -> int:
        """Kills in trials that ended bit-identical, with no failure and no stale file."""
        return sum(trial.kills for trial in self.trials if trial.ok)

    @property
    def kills_in_write(self) -> int:
        return sum(trial.kills_in_write for trial in self.trials)

    @property
    def identical(self) -> int:
        return sum(trial.matched for trial in self.trials)

    @property
    def ok(self) -> bool:
        return all(trial.ok for trial in self.trials)

    def text(self) -> str:
        """The per-trial table and the summary lines."""
        lines = ["trial  kills  in-write  before-config  resumes  restarts  identical  best  s"]
        for t in self.trials:
            lines.append(
                f"{t.index:5d}  {t.kills:5d}  {t.kills_in_write:8d}  {t.kills_before_config:13d}"
                f"  {t.resumes:7d}  {t.restarts:8d}  {'yes' if t.matched else 'NO':>9}"
                f"  {'yes' if t.best_matched else 'NO':>4}  {t.seconds:.0f}"
            )
            lines += [f"       mismatch: {m}" for m in t.mismatches]
            lines += [f"       FAILURE: {f}" for f in t.failures]
            lines += [f"       stale temp file: {s}" for s in t.stale_temp_files]
            lines += [
                f"       temp file left in the run folder: {s}" for s in t.run_folder_temp_files
            ]
        n = len(self.trials)
        lines.append(
            f"reference run {self.reference_seconds:.1f} s (config.json after "
            f"{self.reference_config_seconds:.1f} s)"
        )
        lines.append(
            f"kills survived {self.kills_survived}/{self.kills}, kills during a checkpoint "
            f"write {self.kills_in_write}, trials bit-identical {self.identical}/{n}"
        )
        lines.append(
            f"best.pt bit-identical {sum(t.best_matched for t in self.trials)}/{n}, failures "
            f"{sum(len(t.failures) for t in self.trials)}, stale temp files in checkpoints/ "
            f"{sum(len(t.stale_temp_files) for t in self.trials)} (in run folders "
            f"{sum(len(t.run_folder_temp_files) for t in self.trials)}): "
            + ("OK" if self.ok else "FAILED")
        )
        return "\n".join(lines)


# --- watching for temp files -------------------------------------------------------------------


class _TempFileWatch:
    """Tells when a file is created in a folder: inotify on Linux, polling elsewhere."""

    _IN_CREATE = 0x100
    _IN_MOVED_TO = 0x80
    _IN_NONBLOCK = 0o4000
    _IN_CLOEXEC = 0o2000000

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd = -1
        self.seen = set(self._listing())
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
            if fd >= 0:
                mask = self._IN_CREATE | self._IN_MOVED_TO
                if libc.inotify_add_watch(fd, os.fsencode(folder), mask) >= 0:
                    self.fd = fd
                else:
                    os.close(fd)

    def _listing(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.folder)]
        except FileNotFoundError:
            return []

    def created(self, timeout: float) -> list[str]:
        """Names created since the last call (waiting up to ``timeout`` seconds for one)."""
        if self.fd < 0:
            time.sleep(min(timeout, 0.001))
            names = [name for name in self._listing() if name not in self.seen]
            self.seen.update(names)
            return names
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data, names, offset = os.read(self.fd, 1 << 16), [], 0
        while offset + 16 <= len(data):
            _, _, _, length = struct.unpack_from("iIII", data, offset)
            names.append(data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode())
            offset += 16 + length
        return names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- processes ---------------------------------------------------------------------------------


def _temp_files(run_dir: Path) -> set[tuple[str, int]]:
    """The temp files in the run folder and its checkpoints folder, as (path, inode)."""
    found = set()
    for folder in (run_dir, run_dir / CHECKPOINTS):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if TEMP.match(entry.name):
                found.add((str(Path(entry.path).relative_to(run_dir)), entry.inode()))
    return found


@dataclass(frozen=True)
class Timed:
    """Kill ``fraction`` of an interval after an anchor: the process's start, the interval being
    the expected start-up (``after_saves`` None); or the moment it has rewritten config.json
    (``after_saves`` 0) or saved last.pt ``after_saves`` times, the interval being the one that
    ended there (from config.json to the first save, a guess). Anchoring on the process's own
    progress keeps kills inside its life however fast the machine is at the moment."""

    after_saves: int | None
    fraction: float
    startup: float  # expected seconds from the start to config.json


@dataclass(frozen=True)
class AtTemp:
    """Kill the moment the ``skip + 1``-th temp file matching ``pattern`` appears in
    checkpoints/."""

    pattern: re.Pattern[str]
    skip: int


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class _Progress:
    """When a process writes config.json and then saves last.pt (atomic writes: a new inode)."""

    def __init__(self, run_dir: Path, started: float) -> None:
        self.config, self.last = run_dir / CONFIG, run_dir / CHECKPOINTS / "last.pt"
        self.config_id, self.last_id = _file_id(self.config), _file_id(self.last)
        self.started = started
        self.events: list[float] = []  # config.json written, then each save of last.pt

    def poll(self, now: float) -> None:
        if not self.events:
            if _file_id(self.config) not in (None, self.config_id):
                self.events.append(now)
            return
        last = _file_id(self.last)
        if last not in (None, self.last_id):
            self.last_id = last
            self.events.append(now)

    def deadline(self, timed: Timed) -> float | None:
        """When the timed kill is due, or None while its anchor has not come."""
        k = timed.after_saves
        if k is None:
            return self.started + timed.fraction * timed.startup
        if len(self.events) <= k:
            return None
        before = self.events[k - 1] if k else self.started + (self.events[0] - self.started) / 2
        return self.events[k] + timed.fraction * (self.events[k] - before)


@dataclass
class _Attempt:
    """One process of a trial and how it ended."""

    returncode: int
    killed: bool  # by us
    new_temp_files: list[str]
    had_config: bool
    stderr: str
    config_seconds: float | None  # from the start until it wrote config.json


def _run_process(
    args: Sequence[str],
    run_dir: Path,
    log_stem: Path,
    env: dict[str, str],
    kill: Timed | AtTemp | None,
    timeout: float,
) -> _Attempt:
    """Run ``python -m hooktrain ARGS`` and SIGKILL it as ``kill`` says (None: let it end).

    A process that outlives ``timeout`` seconds is killed too, and reported as a failure.
    """
    before = _temp_files(run_dir)
    with open(f"{log_stem}.out", "wb") as out, open(f"{log_stem}.err", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "hooktrain", *args], stdout=out, stderr=err, env=env
        )
    started = time.monotonic()
    progress = _Progress(run_dir, started)
    watch: _TempFileWatch | None = None
    skip = kill.skip if isinstance(kill, AtTemp) else 0
    sent = timed_out = False

    def send() -> bool:
        if process.poll() is not None:
            return False
        os.kill(process.pid, signal.SIGKILL)
        return True

    try:
        while process.poll() is None and not sent:
            now = time.monotonic()
            progress.poll(now)
            if now - started > timeout:
                timed_out = send()
                break
            if isinstance(kill, AtTemp):
                if watch is None:
                    if not (run_dir / CHECKPOINTS).is_dir():
                        time.sleep(0.005)
                        continue
                    watch = _TempFileWatch(run_dir / CHECKPOINTS)
                    # Temp files made before the watch began (not those left by earlier kills).
                    names = [
                        Path(path).name
                        for path, _ in _temp_files(run_dir) - before
                        if Path(path).parent.name == CHECKPOINTS
                    ]
                else:
                    names = watch.created(0.05)
                for name in names:
                    if kill.pattern.match(name):
                        if skip == 0:
                            sent = send()
                            break
                        skip -= 1
            elif isinstance(kill, Timed):
                due = progress.deadline(kill)
                if due is not None and now >= due:
                    sent = send()
                else:
                    time.sleep(0.005 if due is None else min(0.005, max(due - now, 0)))
            else:
                time.sleep(0.05)
        process.wait()
    finally:
        if watch is not None:
            watch.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    new = sorted(path for path, _ in _temp_files(run_dir) - before)
    stderr = Path(f"{log_stem}.err").read_text(errors="replace")
    if timed_out:
        stderr = f"(killed: still running after {timeout:.0f} s) {stderr}"
    return _Attempt(
        process.returncode,
        sent and not timed_out and process.returncode == KILLED,
        new,
        (run_dir / CONFIG).is_file(),
        stderr,
        progress.events[0] - started if progress.events else None,
    )


def _steps_done(run_dir: Path) -> int:
    """The newest step saved in the run folder's checkpoints (0 when none is readable)."""
    import torch

    steps = [0]
    for path in (run_dir / CHECKPOINTS).glob("*.pt"):
        try:
            steps.append(int(torch.load(path, weights_only=True)["state"]["step"]))
        except Exception:  # a damaged file counts as nothing saved
            continue
    return max(steps)


# --- comparing states --------------------------------------------------------------------------


def _differences(reference: Any, other: Any, where: str = "") -> list[str]:
    """Where two nested structures of tensors and plain values are not bit-identical."""
    import torch

    if isinstance(reference, torch.Tensor) or isinstance(other, torch.Tensor):
        same = (
            isinstance(reference, torch.Tensor)
            and isinstance(other, torch.Tensor)
            and reference.dtype == other.dtype
            and reference.shape == other.shape
            and torch.equal(reference, other)
        )
        return [] if same else [where]
    if isinstance(reference, dict) and isinstance(other, dict):
        if reference.keys() != other.keys():
            return [f"{where} (keys)"]
        return [
            d
            for key in reference
            for d in _differences(reference[key], other[key], f"{where}.{key}")
        ]
    if isinstance(reference, list | tuple) and isinstance(other, list | tuple):
        if len(reference) != len(other):
            return [f"{where} (length)"]
        return [
            d
            for index, (a, b) in enumerate(zip(reference, other, strict=True))
            for d in _differences(a, b, f"{where}[{index}]")
        ]
    return [] if reference == other else [f"{where} ({reference!r} != {other!r})"]


def compare_checkpoints(reference: Path, other: Path) -> list[str]:
    """Where the training state in ``other`` differs from that in ``reference``."""
    import torch

    if not other.is_file():
        return [f"{other.name} is missing"]
    saved = torch.load(other, weights_only=True)["state"]
    return _differences(torch.load(reference, weights_only=True)["state"], saved, "state")


# --- trials ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How the trials train and kill.

    ``kills_per_trial`` kill attempts are made per trial (fewer kills land when the run finishes
    first); ``write_share`` of them (at least one) wait for a checkpoint temp file, and of
    those, ``any_temp_share`` take any temp file (the short-lived ``.NAME.link.tmp`` of a
    copy too) rather than that of a save. ``settings`` are ``--set`` values after
    :data:`SETTINGS`. Of the other, timed kills, ``startup_share`` land at a random moment of
    the process's start-up (before training, often before config.json), the rest at a random
    moment after config.json or after a save (see :class:`Timed`).
    """

    kills_per_trial: int = 4
    write_share: float = 0.5
    any_temp_share: float = 0.25
    startup_share: float = 0.25
    settings: tuple[str, ...] = ()


def _run_args(data_dir: Path, run_dir: Path, options: Options) -> list[str]:
    args = ["run", RECIPE, "--out", str(run_dir), "--data-dir", str(data_dir), "--device", "cpu"]
    args += ["--seed", str(TRAIN_SEED)]
    for setting in (*SETTINGS, *options.settings):
        args += ["--set", setting]
    return args


def _environment(workdir: Path) -> dict[str, str]:
    """The subprocesses' environment: a cache folder of this work folder, hooktrain importable."""
    env = dict(os.environ)
    env["HOOKTRAIN_CACHE_DIR"] = str(workdir / "cache")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


@dataclass
class _Reference:
    folder: Path
    seconds: float
    config_seconds: float
    total_steps: int
    save_steps: list[int]  # the steps after which last.pt is saved


def _reference_run(
    data_dir: Path, workdir: Path, env: dict[str, str], options: Options
) -> _Reference:
    """The uninterrupted run, timed (in all, and until config.json exists)."""
    folder = workdir / "reference"
    if folder.exists():
        raise SystemExit(f"{folder} exists already; pass an empty or new work folder")
    with open(workdir / "reference.log", "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "hooktrain", *_run_args(data_dir, folder, options)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        config_seconds = 0.0
        while process.poll() is None:
            if not config_seconds and (folder / CONFIG).is_file():
                config_seconds = time.monotonic() - started
            time.sleep(0.02)
        seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"the reference run failed (exit {process.returncode}):\n"
            + (workdir / "reference.log").read_text(errors="replace")
        )
    import torch

    steps = int(torch.load(folder / CHECKPOINTS / "last.pt", weights_only=True)["state"]["step"])
    config = json.loads((folder / CONFIG).read_text())
    per_epoch = steps // config["recipe"]["epochs"]
    (settings,) = (p["settings"] for p in config["plugins"] if p["name"] == "checkpoint")
    every = settings["every_steps"] or steps + 1
    save_steps = [s for s in range(1, steps + 1) if s % every == 0 or s % per_epoch == 0]
    return _Reference(folder, seconds, config_seconds or seconds, steps, save_steps)


def _one_trial(
    index: int,
    data_dir: Path,
    workdir: Path,
    reference: _Reference,
    env: dict[str, str],
    rng: random.Random,
    options: Options,
) -> Trial:
    run_dir = workdir / f"trial-{index:03d}" / "run"
    trial = Trial(index, run_dir)
    started = time.monotonic()
    run_dir.parent.mkdir(parents=True)
    kills = options.kills_per_trial
    aimed = min(kills, max(1, round(kills * options.write_share))) if options.write_share else 0
    plan = ["write"] * aimed + ["timer"] * (kills - aimed)
    rng.shuffle(plan)
    timeout = PATIENCE * reference.seconds + 60
    startup = reference.config_seconds
    command = _run_args(data_dir, run_dir, options)
    attempt = planned = 0
    while True:
        mode = plan[planned] if planned < len(plan) else "finish"
        if attempt > 0 and command[0] == "resume":
            trial.resumes += 1
        elif attempt > 0:
            trial.restarts += 1
        kill: Timed | AtTemp | None = None
        done = _steps_done(run_dir)
        saves_left = sum(step > done for step in reference.save_steps)
        if mode == "timer" and rng.random() < options.startup_share:
            kill = Timed(None, rng.random(), startup)
        elif mode == "timer":
            # A random part of the gap after config.json or one of the saves still to come (the
            # last one: while the run finishes).
            kill = Timed(rng.randint(0, saves_left), rng.random(), startup)
        elif mode == "write":
            trial.aimed_at_writes += 1
            pattern = TEMP if rng.random() < options.any_temp_share else SAVE_TEMP
            # One of the next three saves, if the run has that many left.
            kill = AtTemp(pattern, rng.randint(0, max(0, min(2, saves_left - 1))))
        result = _run_process(
            command,
            run_dir,
            run_dir.parent / f"{attempt:02d}-{command[0]}-{mode}",
            env,
            kill,
            timeout,
        )
        if result.config_seconds is not None:
            startup = result.config_seconds
        with open(run_dir.parent / "attempts.log", "a") as log:
            print(
                f"{attempt:02d} {' '.join(command[:2])} from step {done}: {kill}; exit "
                f"{result.returncode}, killed by us {result.killed}, new temp files "
                f"{result.new_temp_files}",
                file=log,
            )
        attempt += 1
        planned += 1
        if result.killed:
            trial.kills += 1
            trial.kills_in_write += any(
                Path(path).parent.name == CHECKPOINTS for path in result.new_temp_files
            )
            trial.kills_before_config += not result.had_config
            command = ["resume", str(run_dir)]
            continue
        if result.returncode == 0:
            break
        if command[0] == "resume" and "is not a hooktrain run folder" in result.stderr:
            command = _run_args(data_dir, run_dir, options)  # killed before config.json
            planned -= 1  # this process did not train: the planned kill is still to come
            continue
        if command[0] == "resume" and "has finished" in result.stderr:
            break  # the kill came after the last checkpoint was saved
        trial.failures.append(
            f"`hooktrain {' '.join(command)}` exited {result.returncode}: "
            + result.stderr.strip()[-2000:]
        )
        break
    if not trial.failures:
        last, best = (Path(CHECKPOINTS) / name for name in ("last.pt", "best.pt"))
        trial.mismatches = compare_checkpoints(reference.folder / last, run_dir / last)
        trial.matched = not trial.mismatches
        best_differences = compare_checkpoints(reference.folder / best, run_dir / best)
        trial.best_matched = not best_differences
        trial.mismatches += [f"best.pt: {d}" for d in best_differences]
    temps = sorted(path for path, _ in _temp_files(run_dir))
    trial.stale_temp_files = [p for p in temps if Path(p).parent.name == CHECKPOINTS]
    trial.run_folder_temp_files = [p for p in temps if Path(p).parent.name != CHECKPOINTS]
    trial.seconds = time.monotonic() - started
    return trial


def run_trials(
    trials: int,
    data_dir: Path | None,
    workdir: Path,
    rng_seed: int = 0,
    options: Options = Options(),  # frozen: one shared default is safe
    echo: Callable[[str], None] = print,
) -> Summary:
    """Run the reference, then ``trials`` kill-and-resume trials, in ``workdir``.

    Without ``data_dir``, a tiny official-format data set is written into ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conftest import write_cifar_batches

        data_dir = workdir / "data"
        if not data_dir.exists():
            write_cifar_batches(data_dir, n_train=400, n_test=100)
    data_dir = data_dir.resolve()
    env = _environment(workdir)
    reference = _reference_run(data_dir, workdir, env, options)
    echo(f"reference run: {reference.seconds:.1f} s, {reference.total_steps} steps")
    rng = random.Random(rng_seed)
    results = []
    for index in range(trials):
        trial = _one_trial(index, data_dir, workdir, reference, env, rng, options)
        echo(
            f"trial {index}: {trial.kills} kills ({trial.kills_in_write} in a write), "
            f"{'bit-identical' if trial.matched else 'DIFFERENT'}"
            + ("" if trial.ok else " FAILED")
            + f", {trial.seconds:.0f} s"
        )
        results.append(trial)
    return Summary(results, reference.seconds, reference.config_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status is 0 when every trial passed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials to run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill timings")
    parser.add_argument(
        "--data-dir", type=Path, help="CIFAR-10 folder (default: a tiny made-up one)"
    )
    parser.add_argument("--out", type=Path, help="new or empty work folder (default: a temp one)")
    parser.add_argument(
        "--max-kills-per-trial",
        type=int,
        default=Options.kills_per_trial,
        help="kill attempts per trial; fewer land when the run finishes first (default 4)",
    )
    parser.add_argument(
        "--write-share",
        type=float,
        default=Options.write_share,
        help="share of the kills aimed at a checkpoint write (default 0.5)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another recipe or plugin setting for every run (repeatable)",
    )
    args = parser.parse_args(argv)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    print(f"work folder: {workdir}", flush=True)
    options = Options(
        kills_per_trial=args.max_kills_per_trial,
        write_share=args.write_share,
        settings=tuple(args.settings),
    )
    summary = run_trials(
        args.trials,
        args.data_dir,
        workdir,
        args.seed,
        options,
        echo=lambda line: print(line, flush=True),
    )
    print(summary.text())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())

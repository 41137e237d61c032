"""Start one training job: plain ``python -m lcnn.train`` on one device, ``torchrun --standalone`` across several.

The train rules ``exec`` this launcher, so it is the process SLURM and Snakemake see. It imports no torch (a job
starts fast), picks the launcher explicitly (a user's ``accelerate config`` file cannot change it), gives every
multi-process job its own free rendezvous port (two jobs on one node never collide), and when the trainer dies by a
signal (a segfault, the OOM killer) it says so as the log's last line, so a retry is never a mystery.

Signals: SLURM (``--signal=TERM@120``, ``scancel``) and a terminal's Ctrl-C signal the whole process group, so the
trainer receives them itself; the launcher only outlives them to report how the trainer ended. Under
``python -m lcnn.forkserver`` (``make demo``) a one-process trainer is forked by that server instead, in a process
group of its own, and the launcher forwards the signals to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcnn import forkserver

# a trainer saves its state within this many seconds of SIGTERM (profiles/slurm signals 120 s before the limit);
# torchrun waits this long before it SIGKILLs its workers
SHUTDOWN_TIMEOUT_S = 100
# SLURM's time limit and preemption (SIGTERM, SIGUSR1) and Ctrl-C: the trainer saves its state and exits
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# what torchrun forwards to its workers: its default four and SIGUSR1
TORCHRUN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", which Snakemake's retry and a SLURM requeue do
# where each rank of a torchrun job notes that it saved its state and is exiting EXIT_PREEMPTED: torchrun itself
# reports any worker's non-zero exit as 1, and the job should end as a one-process job does
EXIT_DIR_ENV = "LCNN_EXIT_DIR"
FAILED_LOGS = "failed_attempts"  # in the run folder: the logs of attempts that failed, which a retry would delete


def torchrun_takes(flag: str) -> bool:
    """Whether this torch's torchrun takes ``flag`` (``--shutdown_timeout`` and ``--signals-to-handle`` are recent),
    read from its source.

    An older torchrun rejects an unknown flag and every multi-GPU job would fail at launch. Reading the file keeps
    this launcher free of ``import torch``.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    run_py = Path(spec.origin).parent / "distributed" / "run.py"
    return run_py.is_file() and flag in run_py.read_text()


def command(nproc: int, train_args: list[str]) -> list[str]:
    """The trainer's command line for ``nproc`` processes on this node."""
    if nproc <= 1:
        return [sys.executable, "-m", "lcnn.train", *train_args]
    flags = []
    if torchrun_takes("--shutdown_timeout"):  # without it torchrun's own grace before it kills its workers applies
        flags.append(f"--shutdown_timeout={SHUTDOWN_TIMEOUT_S}")
    else:
        _warn("no --shutdown_timeout; on SIGTERM it may kill the trainers before they save")
    if torchrun_takes("--signals-to-handle"):  # by default torchrun dies at once of SIGUSR1, the trainers' other stop
        flags.append("--signals-to-handle=" + ",".join(s.name for s in TORCHRUN_SIGNALS))
    else:
        _warn("no --signals-to-handle; SIGUSR1 ends it at once, so stop the job with SIGTERM")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun: one node, a free port (c10d on localhost:0), no accelerate config file
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        *flags,
        "-m",
        "lcnn.train",
        *train_args,
    ]


def _warn(what: str) -> None:
    print(
        f"lcnn launch: this torch's torchrun has {what} (newer torch releases have the flag)",
        file=sys.stderr,
        flush=True,
    )


def preempted_ranks(exit_dir: Path) -> int:
    """How many ranks noted in ``exit_dir`` that they saved their state and exited EXIT_PREEMPTED."""
    return sum(p.read_text().strip() == str(EXIT_PREEMPTED) for p in exit_dir.glob("rank*.exit"))


def note_preempted(rank: int) -> None:
    """A trainer's rank notes, for the launcher, that it saved its state and exits EXIT_PREEMPTED."""
    if exit_dir := os.environ.get(EXIT_DIR_ENV):
        (Path(exit_dir) / f"rank{rank}.exit").write_text(f"{EXIT_PREEMPTED}\n")


def start_trainer(
    nproc: int, train_args: list[str], env: dict[str, str]
) -> subprocess.Popen | forkserver.RemoteProcess:
    """Start the trainer: forked by the fork server where one runs this job's command (``make demo``), else a new
    process (torchrun's for several)."""
    path = os.environ.get(forkserver.FORKSERVER_ENV)
    if nproc <= 1 and path and "SLURM_JOB_ID" not in os.environ:  # a SLURM job's trainer stays in its allocation
        try:
            return forkserver.start(path, "lcnn.train", train_args, env)
        except forkserver.ForkServerError as err:
            print(f"lcnn launch: {err}; starting the trainer as a new process", file=sys.stderr, flush=True)
    return subprocess.Popen(command(nproc, train_args), env=env)


def run(cfg: dict) -> dict:
    """Run the trainer to its end; return its exit status and, when a signal ended it, the signal's name."""
    nproc = int(cfg["nproc"])
    started: list[subprocess.Popen | forkserver.RemoteProcess] = []
    early: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        """The process group delivers a stop signal to a trainer started here; one forked by the fork server is in a
        group of its own, so it is forwarded. One that came before the trainer existed is sent once it does. Either
        way the launcher stays alive to report the outcome."""
        if not started:
            early.append(sig)
        for proc in started:
            if isinstance(proc, forkserver.RemoteProcess):
                proc.send_signal(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lcnn-exit-") as exit_dir:
        proc = start_trainer(nproc, list(cfg["train_args"]), {**os.environ, EXIT_DIR_ENV: exit_dir})
        started.append(proc)
        for sig in early:  # a trainer that has no handlers yet dies of it: reported below, and the retry resumes
            proc.send_signal(sig)
        try:
            code = proc.wait()
        except forkserver.ForkServerError as err:
            print(f"lcnn launch: {err}; its outcome is unknown, a retry resumes", file=sys.stderr, flush=True)
            code = 1
        if code > 0 and nproc > 1 and preempted_ranks(Path(exit_dir)) == nproc:
            print(
                f"lcnn launch: all {nproc} trainers saved their state and exited {EXIT_PREEMPTED} (torchrun "
                f"reported {code}); exiting {EXIT_PREEMPTED} so a retry resumes",
                file=sys.stderr,
                flush=True,
            )
            code = EXIT_PREEMPTED
    result = {"returncode": code, "signal": None, "seconds": time.monotonic() - start}
    kept = keep_failed_log(list(cfg["train_args"])) if code not in (0, EXIT_PREEMPTED) else None
    if code < 0:
        result["signal"] = signal.Signals(-code).name
        print(
            f"lcnn launch: the trainer (pid {proc.pid}) died by {result['signal']} after {result['seconds']:.0f} s "
            "without saving its state; a retry resumes from the last saved epoch"
            + (f" (this attempt's log is kept as {kept})" if kept else ""),
            file=sys.stderr,
            flush=True,
        )
    return result


def keep_failed_log(train_args: list[str]) -> Path | None:
    """Copy a failed attempt's log (this process's standard output, where it is a file: the rule's log) into the run
    folder's ``failed_attempts/``: Snakemake deletes a job's log before its retry, and with it the traceback."""
    try:
        log = Path(os.readlink("/proc/self/fd/1"))
        out_dir = Path(train_args[train_args.index("--out-dir") + 1])
    except (OSError, ValueError, IndexError):  # no /proc, or no run folder named
        return None
    if not log.is_file():  # a terminal or a pipe: nothing to lose
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = out_dir / FAILED_LOGS / f"{stamp}-{os.environ.get('SLURM_JOB_ID') or f'pid{os.getpid()}'}.log"
    try:
        sys.stdout.flush()
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, kept)
    except OSError:
        return None
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Launch lcnn.train on one or several devices of this node.",
        usage="python -m lcnn.launch --nproc N -- <lcnn.train arguments>",
    )
    parser.add_argument("--nproc", type=int, default=1, help="training processes (one per GPU of the job)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for lcnn.train, after --")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    result = run({"nproc": args.nproc, "train_args": train_args})
    code = result["returncode"]
    sys.exit(128 - code if code < 0 else code)  # a shell's convention: 128 + signal number


if __name__ == "__main__":
    main()

"""Which job trains a run folder: one at a time, or their saves destroy each other.

A second trainer on a run folder happens when the main Snakemake dies (a login node's reboot, a SIGKILL) and is
started again while its SLURM jobs still run: the new Snakemake does not know them and, with ``rerun-incomplete``,
submits each run again. Both would then train the same run for hours, deleting each other's saved state. So the
trainer's first process writes :data:`OWNER` (its SLURM job, or its host and pid) into the run folder, and a
trainer that finds one naming another job that still runs stops at once, in one line that names it.

Only a job that is known to run blocks: a SLURM job that ``squeue`` lists as not yet finished, or a process of this
host whose pid and start time match. Anything that cannot be checked (another host without SLURM, no ``squeue``)
does not block, as before this guard existed.

That guard cannot see a resubmitted job that is still queued when the first one finishes: it starts later, finds
no state (a finished run deletes it) and trains the run again. So :func:`check_no_study_jobs` stops a Snakemake
that would submit to SLURM while jobs of the same study (its working directory) are still queued or running.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from lcnn.utils import LcnnError, atomic_write_json

OWNER = "owner.json"
# squeue states of a job that may still train (COMPLETING: its processes have ended, only the epilog runs)
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
               "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}  # fmt: skip


def this_job() -> dict[str, Any]:
    """This trainer's identity: its SLURM job where there is one, and its host, pid and the pid's start time."""
    pid = os.getpid()
    return {"slurm_job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": pid,
            "start": _start_time(pid)}  # fmt: skip


def claim(run_dir: str | os.PathLike) -> None:
    """Record this job as the one training ``run_dir``; stop, in one line, if another job still trains it."""
    path = Path(run_dir) / OWNER
    me = this_job()
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: nobody to wait for
        other = None
    if other and _other_live_job(other, me):
        who = f"SLURM job {other['slurm_job_id']}" if other.get("slurm_job_id") else f"pid {other['pid']}"
        raise LcnnError(
            f"{run_dir} is being trained by {who} on {other.get('host')}, which is still running (a Snakemake "
            f"restarted while its jobs ran submits them again); wait for it to end, or `scancel` it, and rerun"
        )
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, me)


def release(run_dir: str | os.PathLike) -> None:
    """Remove the record once this process no longer trains the run: only a record of this very process (job,
    host, pid and start time), never one that refused it (another node's trainer may have the same pid)."""
    path = Path(run_dir) / OWNER
    try:
        if json.loads(path.read_text()) == this_job():
            path.unlink()
    except (OSError, ValueError):
        pass


def _other_live_job(other: dict[str, Any], me: dict[str, Any]) -> bool:
    if other.get("slurm_job_id") and other["slurm_job_id"] != me["slurm_job_id"]:
        return slurm_job_live(str(other["slurm_job_id"]))
    # no SLURM job, or this one (requeued by SLURM, or trainers started inside one allocation): the process decides
    if other.get("host") != me["host"] or other.get("pid") == me["pid"]:
        return False  # another host's process cannot be checked from here; our own pid is us
    return other.get("start") is not None and _start_time(int(other["pid"])) == other["start"]


def slurm_job_live(job_id: str) -> bool:
    """Whether SLURM still lists ``job_id`` as a job that may run; False where ``squeue`` cannot say."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and any(state.strip() in LIVE_STATES for state in proc.stdout.splitlines())


def study_jobs(workdir: str | os.PathLike) -> list[str]:
    """This user's SLURM jobs, not yet ended, that a Snakemake in ``workdir`` submitted: the SLURM executor plugin
    comments each job ``rule_<rule>[_wildcards_<values>]`` and starts it in the workflow's directory. Empty where
    ``squeue`` cannot say."""
    try:
        cmd = ["squeue", "-u", getpass.getuser(), "-h", "-o", "%i|%T|%k|%Z"]  # -u: also SLURM before 20.11's --me
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    here, jobs = os.path.realpath(workdir), []
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        job, state, comment, cwd = (line.split("|", 3) + [""] * 3)[:4]
        if state.strip() in LIVE_STATES and comment.startswith("rule_") and os.path.realpath(cwd.strip()) == here:
            jobs.append(f"{job} {comment.removeprefix('rule_')} ({state.strip().lower()})")
    return jobs


def check_no_study_jobs(workdir: str | os.PathLike) -> None:
    """Stop, in one line, a Snakemake about to submit to SLURM while this study's jobs from an earlier one still
    wait or run: it would submit them again, and a twin that starts after its first has finished trains the run
    a second time. ``LCNN_ALLOW_LIVE_JOBS=1`` skips the check."""
    if os.environ.get("LCNN_ALLOW_LIVE_JOBS") == "1":
        return
    jobs = study_jobs(workdir)
    if jobs:
        more = f" and {len(jobs) - 3} more" if len(jobs) > 3 else ""
        raise LcnnError(
            f"{len(jobs)} SLURM jobs of this study are still queued or running ({', '.join(jobs[:3])}{more}), "
            "submitted by an earlier Snakemake: started now, it would submit them again and train those runs twice; "
            "wait for them (`squeue --me`) or `scancel` them (a running one saves its state, and the rerun resumes "
            "it), then start again (LCNN_ALLOW_LIVE_JOBS=1 skips this check, e.g. for a second Snakemake running "
            "other targets in this directory)"
        )


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): a pid with another start
    time is another process that reused the number. None where there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])

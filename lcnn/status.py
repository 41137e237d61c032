"""How far the study has got: every expected run's state, the GPU-hours spent and an estimate of what is left.

Why: with hundreds of SLURM jobs in flight, Snakemake's own output says little about the study as a whole. This
reads only what the workflow leaves on disk (run folders, results, rule logs) and, where SLURM answers, the job
states from ``sacct`` (history) and ``squeue`` (live). It never touches ``.snakemake/`` (its lock included), so
it is safe while Snakemake runs::

    python -m lcnn.status                       # the study in config.yaml, from the current folder
    python -m lcnn.status --configfile profiles/demo/study.yaml --json

A run is ``done`` or ``diverged`` (its metrics.json says so), ``running`` or ``queued`` (SLURM says so; without
SLURM, a rule log written to within ``--stale-after`` minutes counts as running), ``failed`` (a log or a failed
SLURM job, and no metrics: the log path is given) or ``pending`` (nothing yet). The SLURM executor plugin names a
job by Snakemake's run UUID and writes ``rule_<rule>_wildcards_<values joined by _>`` as its comment; that comment
is how a job is matched to its run (or, where accounting keeps no comments, its log under ``logs/slurm/``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from lcnn import config as study
from lcnn.utils import LcnnError, cli

STATES = ("done", "running", "queued", "failed", "diverged", "pending")
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "SUSPENDED", "RESIZING"}
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"}
SACCT_FIELDS = ["JobID", "JobName", "State", "Comment", "Elapsed", "Submit", "AllocTRES"]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) .*?top1 ([0-9.]+|nan)")  # the trainer's end-of-epoch line
STEP_LINE = re.compile(r"epoch (\d+) step (\d+)/(\d+)")


def load_config(workdir: Path, configfiles: list[str]) -> dict[str, Any]:
    """config.yaml with ``configfiles`` merged on top, as ``snakemake --configfile`` does, then validated."""
    paths = list(dict.fromkeys(p.resolve() for p in [workdir / "config.yaml", *(workdir / p for p in configfiles)]))
    for path in paths:
        if not path.is_file():
            raise LcnnError(f"config file {path} does not exist; pass --configfile files relative to --directory")
    return study.load_config(paths)


# ------------------------------------------------------------------------------------------------------- SLURM
def _query(cmd: list[str]) -> tuple[list[list[str]] | None, str]:
    """A SLURM command's '|'-separated output lines, or None and why it gave none."""
    if shutil.which(cmd[0]) is None:
        return None, f"no {cmd[0]} on this machine"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{cmd[0]} did not answer ({type(err).__name__})"
    if proc.returncode != 0:
        return None, f"{cmd[0]} failed ({(proc.stderr.strip().splitlines() or [''])[0]})"
    return [line.split("|") for line in proc.stdout.splitlines() if line.strip()], ""


def slurm_jobs(since: str = "now-30days") -> tuple[list[dict[str, str]] | None, str]:
    """This user's SLURM jobs: ``sacct`` for the history, ``squeue`` for the live ones, or None and why.

    squeue comes last and wins: accounting may only store a job's comment when the job ends, while the
    controller knows it from submission (seen on the SLURM test cluster).
    """
    done, why_a = _query(["sacct", "-X", "-n", "-P", "--starttime", since, "-o", ",".join(SACCT_FIELDS)])
    live, why_q = _query(["squeue", "--me", "-h", "-o", "%i|%j|%T|%k|%M|%V|%b"])
    if done is None and live is None:
        return None, f"{why_a}; {why_q}: SLURM job states not read"
    jobs = {r[0]: dict(zip(SACCT_FIELDS, r)) for r in done or [] if len(r) == len(SACCT_FIELDS)}
    jobs.update({r[0]: dict(zip(SACCT_FIELDS, r)) for r in live or [] if len(r) == len(SACCT_FIELDS)})
    note = f"{len(jobs)} SLURM jobs since {since} ({len(live or [])} in the queue)"
    missing = "; ".join(w for w in (why_a, why_q) if w)
    return list(jobs.values()), note + (f"; {missing}" if missing else "")


def _seconds(elapsed: str) -> float:
    """SLURM's [D-]HH:MM:SS (or MM:SS) as seconds."""
    days, _, clock = elapsed.rpartition("-")
    parts = [float(p) for p in clock.split(":") if p]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (float(days) if days else 0.0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _gpus(tres: str) -> int:
    """GPUs in sacct's AllocTRES (gres/gpu:a100=2) or squeue's tres-per-node (gres:gpu:a100:2)."""
    counts = [int(n) for n in re.findall(r"gpu(?::[A-Za-z][\w-]*)?[:=](\d+)", tres or "")]
    return max(counts) if counts else 0


def slurm_log_keys(workdir: Path) -> dict[str, tuple[str, str]]:
    """Job id -> (rule, wildcard string), from the plugin's logs/slurm/rule_<rule>/<wildcards>/<jobid>.log."""
    keys = {}
    for log in (workdir / "logs" / "slurm").glob("rule_*/*/*.log"):
        keys[log.stem] = (log.parent.parent.name.removeprefix("rule_"), log.parent.name)
    return keys


def jobs_by_run(jobs: list[dict[str, str]], log_keys: dict[str, tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """The latest SLURM job per (rule, wildcard string), matched by the plugin's comment or else by its log."""
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for job in jobs:
        match = re.fullmatch(r"rule_(.+?)_wildcards_(.+)", job["Comment"].strip())
        key = (match[1], match[2]) if match else log_keys.get(job["JobID"])
        if key is None:
            continue
        best = latest.get(key)
        if best is None or (job["Submit"], _jobid(job)) > (best["Submit"], _jobid(best)):
            latest[key] = job
    return latest


def _jobid(job: dict[str, str]) -> int:
    digits = re.match(r"\d+", job["JobID"])
    return int(digits[0]) if digits else -1


# -------------------------------------------------------------------------------------------------- run folders
def expected_runs(cfg: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Every run the config asks for; under halving, each run's latest rung found on disk (rung 1 before any)."""
    halving = study.search_mode(cfg) == "halving"
    schedule = study.rung_schedule(cfg) if halving else None
    rows = []
    for r in study.runs(cfg):
        m, v, s = r["model"], r["variant"], r["seed"]
        epochs = study.hparams(cfg, v)["epochs"]
        row = {"model": m, "variant": v, "seed": s, "rung": None, "epochs": epochs}
        if halving:
            found = [int(p.name[4:]) for p in (workdir / f"runs_halving/{m}/{v}/seed{s}").glob("rung*")]
            logs = [int(p.stem[4:]) for p in (workdir / f"logs/train_rung/{m}/{v}/seed{s}").glob("rung*.log")]
            rung = max(found + logs, default=1)
            row.update(rung=rung, epochs=schedule[rung - 1], rule="train_rung", key=f"{m}_{v}_{s}_{rung}")
            row.update(
                run_dir=f"runs_halving/{m}/{v}/seed{s}/rung{rung}",
                log=f"logs/train_rung/{m}/{v}/seed{s}/rung{rung}.log",
            )
        else:
            row.update(rule="train", key=f"{m}_{v}_{s}", run_dir=f"runs/{m}/{v}/seed{s}")
            row["log"] = f"logs/train/{m}/{v}/seed{s}.log"
        rows.append(row)
    return rows


def log_progress(path: Path) -> dict[str, Any]:
    """Last finished epoch and its top-1, and the epoch/step in progress, from a rule log; plus its last error."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    out: dict[str, Any] = {"epoch": None, "top1": None, "step": None, "error": None}
    for epoch, _, top1 in EPOCH_LINE.findall(text):
        out["epoch"], out["top1"] = int(epoch), None if top1 == "nan" else float(top1)  # None: JSON has no NaN
    steps = STEP_LINE.findall(text)
    if steps:
        out["step"] = f"epoch {steps[-1][0]} step {steps[-1][1]}/{steps[-1][2]}"
    errors = [ln.strip() for ln in text.splitlines() if re.search(r"error|Traceback|Killed", ln)]
    out["error"] = errors[-1][:200] if errors else None
    return out


def run_status(row: dict[str, Any], workdir: Path, job: dict[str, str] | None, stale_after_s: float) -> dict:
    """One run's state from its metrics.json, its SLURM job and its rule log, in that order of trust."""
    run_dir, log = workdir / row["run_dir"], workdir / row["log"]
    out = {**row, "status": "pending", "top1": None, "epoch_done": None, "device_hours": None, "detail": ""}
    out.update(slurm_job_id=job["JobID"] if job else None, slurm_state=job["State"].split()[0] if job else None)
    out["gpu_hours_running"] = 0.0
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        out.update(epoch_done=m.get("epochs_completed"), device_hours=m.get("device_hours") or 0.0)
        if m.get("status") == "diverged":
            at = m.get("diverged_at") or {}
            out.update(
                status="diverged",
                detail=at.get("reason") or f"loss not finite at epoch {at.get('epoch')} step {at.get('step')}",
            )
        else:
            out.update(status="done", top1=m.get("top1"))
        return out
    progress = log_progress(log)
    out.update(epoch_done=progress["epoch"], top1=progress["top1"])
    state = out["slurm_state"]
    state_saved = any(run_dir.glob("train_state*"))
    if state in SLURM_RUNNING:
        out.update(status="running", detail=progress["step"] or "")
        out["gpu_hours_running"] = _seconds(job["Elapsed"]) * max(_gpus(job["AllocTRES"]), 1) / 3600
    elif state in SLURM_QUEUED:
        out.update(status="queued", detail="resumes from its saved state" if state_saved else "")
    elif state is not None or log.is_file():
        recent = log.is_file() and time.time() - log.stat().st_mtime < stale_after_s
        if state is None and recent:
            out.update(status="running", detail=progress["step"] or "")
        else:
            why = f"SLURM {state}" if state else (progress["error"] or "no metrics.json")
            keep = "; state saved, a rerun resumes" if state_saved else ""
            out.update(status="failed", detail=f"{why}{keep}; see {row['log']}")
    return out


# ------------------------------------------------------------------------------------------------- the summary
def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """The study's status (``cfg``: directory, configfiles, since, stale_after_min, slurm)."""
    workdir = Path(cfg.get("directory") or ".")
    conf = load_config(workdir, cfg.get("configfiles") or [])
    jobs, slurm_note = slurm_jobs(cfg.get("since", "now-30days")) if cfg.get("slurm", True) else (None, "off")
    by_run = jobs_by_run(jobs, slurm_log_keys(workdir)) if jobs else {}
    stale = 60 * cfg.get("stale_after_min", 30)
    rows = [run_status(r, workdir, by_run.get((r["rule"], r["key"])), stale) for r in expected_runs(conf, workdir)]
    for row in rows:
        result = workdir / f"results/{row['model']}/{row['variant']}.json"
        row["result"] = str(result.relative_to(workdir)) if result.is_file() else None
    counts = {s: sum(r["status"] == s for r in rows) for s in STATES}
    spent = sum(r["device_hours"] or 0.0 for r in rows)
    running = sum(r["gpu_hours_running"] for r in rows)
    return {
        "directory": str(workdir.resolve()),
        "search_mode": study.search_mode(conf),
        "runs": rows,
        "counts": counts,
        "total": len(rows),
        "gpu_hours": {"finished": spent, "running": running, "total": spent + running},
        "estimate": estimate(rows, conf),
        "slurm": {"available": jobs is not None, "note": slurm_note},
    }


def estimate(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """GPU-hours left from the measured device-hours per epoch (per model; the all-model mean where a model has
    no finished run yet), and the wall-clock time that is at the current number of running jobs."""
    rates: dict[str, list[float]] = {}
    for r in rows:
        if r["status"] in ("done", "diverged") and r["epoch_done"]:
            rates.setdefault(r["model"], []).append(r["device_hours"] / r["epoch_done"])
    if not rates:
        return {"gpu_hours_left": None, "hours_left": None, "note": "no finished run yet to measure a rate from"}
    overall = sum(sum(v) for v in rates.values()) / sum(len(v) for v in rates.values())
    per_model = {m: sum(v) / len(v) for m, v in rates.items()}
    left, guessed = 0.0, set()
    for r in rows:
        if r["status"] in ("done", "diverged"):
            continue
        remaining = r["epochs"] - (r["epoch_done"] or 0) if r["status"] == "running" else r["epochs"]
        if r["model"] not in per_model:
            guessed.add(r["model"])
        left += max(remaining, 0) * per_model.get(r["model"], overall)
    gpus = cfg["train"]["gpus_per_job"]
    n_running = sum(r["status"] == "running" for r in rows)
    note = "from the device-hours per epoch of finished runs"
    if guessed:
        note += f"; {', '.join(sorted(guessed))} at the all-model mean (no finished run yet)"
    if study.search_mode(cfg) == "halving":
        note += "; halving: only the rungs known so far"
    return {
        "gpu_hours_left": left,
        "hours_left": left / (n_running * gpus) if n_running else None,
        "running_jobs": n_running,
        "device_hours_per_epoch": per_model,
        "note": note,
    }


def to_text(status: dict[str, Any]) -> str:
    """The table (pandas + tabulate) and the summary lines."""
    import pandas as pd

    rows = status["runs"]
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["epoch"] = [
            f"{r['epoch_done'] or 0}/{r['epochs']}" + (f" (rung {r['rung']})" if r["rung"] else "") for r in rows
        ]
        frame["top1"] = frame["top1"].map(lambda v: "" if v is None or v != v else f"{v:.2f}")
        frame["slurm"] = [f"{r['slurm_job_id']} {r['slurm_state']}" if r["slurm_job_id"] else "" for r in rows]
        table = frame[["model", "variant", "seed", "status", "epoch", "top1", "slurm", "detail"]]
        lines = [table.to_markdown(index=False, tablefmt="simple")]
    else:
        lines = ["(no runs selected)"]
    if len(frame) > 1:  # one line per model: how many of its runs are in each state
        per_model = pd.crosstab(frame["model"], frame["status"]).reindex(columns=list(STATES), fill_value=0)
        lines += ["", per_model.to_markdown(tablefmt="simple")]
    counts = ", ".join(f"{n} {s}" for s, n in status["counts"].items() if n)
    gh, est = status["gpu_hours"], status["estimate"]
    lines += [
        "",
        f"runs: {status['total']} ({counts})",
        f"GPU-hours spent: {gh['total']:.2f} ({gh['finished']:.2f} in finished runs, {gh['running']:.2f} running)",
    ]
    if est["gpu_hours_left"] is None:
        lines.append(f"time left: not estimated ({est['note']})")
    else:
        wall = (
            f"{est['hours_left']:.1f} h at {est['running_jobs']} running jobs"
            if est["hours_left"]
            else "no job running"
        )
        lines.append(f"time left: {est['gpu_hours_left']:.2f} GPU-hours, {wall} ({est['note']})")
    lines.append(f"SLURM: {status['slurm']['note']}")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The study's status: each run, GPU-hours spent and left.")
    parser.add_argument("--directory", "-d", default=".", help="the workflow folder (where Snakemake runs)")
    parser.add_argument("--configfile", "--configfiles", nargs="*", default=[], help="overlays on config.yaml")
    parser.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    parser.add_argument("--since", default="now-30days", help="oldest SLURM jobs to read (sacct --starttime)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=30,
        help="minutes without a log line before a run that SLURM does not know of counts as failed, not running",
    )
    parser.add_argument("--no-slurm", action="store_true", help="do not ask sacct")
    args = parser.parse_args(argv)
    status = run(
        {
            "directory": args.directory,
            "configfiles": args.configfile,
            "since": args.since,
            "stale_after_min": args.stale_after,
            "slurm": not args.no_slurm,
        }
    )
    print(json.dumps(status, indent=2) if args.json else to_text(status))


if __name__ == "__main__":
    main()

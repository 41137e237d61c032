"""Measure what parsing the workflow costs: a dry run of the real config against a trivial Snakefile, side by side.

Why: every SLURM job re-parses the Snakefile, and every ``snakemake`` call pays the parse before it does anything.
The goal is a dry run of the real 336-training-job config within 1.5 s of a trivial Snakefile with the same
number of jobs. An empty ImageNet-shaped tree (1,000 empty class folders) stands in for the data::

    python -m lcnn.tools.parse_bench --repeats 5

A trap: where the SLURM client is installed but no controller answers, the SLURM executor plugin spends seconds in
``sacct``/``scontrol`` every time snakemake starts, for any Snakefile. So each pair is timed twice where ``sinfo``
is on PATH: as is ("slurm client on PATH") and with a PATH that hides the SLURM commands ("no slurm client").
One untimed warm-up run of each Snakefile comes first (it also fills the timm-name cache under .snakemake/lcnn).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lcnn.prepare import imagenet_synsets
from lcnn.utils import LcnnError, atomic_write_json, cli

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "envs", "schemas", "report", "profiles")
SLURM_TOOLS = set(
    "sacct sacctmgr salloc sattach sbatch sbcast scancel scontrol scrontab sdiag sh5util sinfo sprio squeue sreport "
    "srun sshare sstat strigger sview".split()
)
TRIVIAL = """N = {jobs}


rule all:
    input:
        expand("out/{{i}}.txt", i=range(N)),


rule make:
    output:
        "out/{{i}}.txt",
    log:
        "logs/{{i}}.log",
    shell:
        "touch {{output}} 2> {{log}}"
"""


def real_workdir(base: Path) -> tuple[Path, list[str]]:
    """A copy of the workflow and an overlay pointing data.imagenet at an empty ImageNet-shaped tree."""
    work = base / "real"
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name)
        else:
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    tree = base / "imagenet"
    for wnid in imagenet_synsets():
        (tree / "train" / wnid).mkdir(parents=True)
    (tree / "val").mkdir()
    (tree / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    paths = {"train_dir": f"{tree}/train", "val_dir": f"{tree}/val", "val_labels": f"{tree}/LOC_val_solution.csv"}
    (work / "paths.yaml").write_text(yaml.safe_dump({"data": {"imagenet": paths}}))
    return work, ["--configfile", "config.yaml", "paths.yaml"]


def hidden_slurm_path(base: Path) -> str:
    """PATH with the SLURM client commands hidden: a folder of links to everything else on PATH."""
    farm = base / "bin_without_slurm"
    farm.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder) or folder == str(Path(sys.executable).parent):
            continue
        for entry in os.scandir(folder):
            target = farm / entry.name
            if entry.name not in SLURM_TOOLS and not target.exists():
                target.symlink_to(entry.path)
    return os.pathsep.join([str(Path(sys.executable).parent), str(farm)])


def dry_run(workdir: Path, args: list[str], path: str, importtime: bool = False) -> tuple[float, str, str]:
    """Wall seconds of ``snakemake -n`` in ``workdir``, with its stdout and stderr."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "snakemake", "-n", "--cores", "1"]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *args], cwd=workdir, env={**os.environ, "PATH": path}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise LcnnError(f"snakemake -n failed in {workdir}: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, proc.stdout, proc.stderr


def job_total(stdout: str) -> int:
    found = re.search(r"^total\s+(\d+)$", stdout.split("Job stats:", 1)[-1], re.M)
    if not found:
        raise LcnnError("the dry run printed no job total; run `snakemake -n` by hand to see why")
    return int(found[1])


def imported(importtime_stderr: str, names: tuple[str, ...] = ("torch", "timm")) -> list[str]:
    """Top-level packages among ``names`` that ``python -X importtime`` saw imported."""
    seen = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime_stderr.splitlines() if "|" in line}
    return [n for n in names if n in seen]


def run(repeats: int = 5) -> dict[str, Any]:
    """Time both dry runs ``repeats`` times, interleaved, for each PATH; medians and their difference."""
    with tempfile.TemporaryDirectory(prefix="lcnn_parse_bench_") as tmp:
        base = Path(tmp)
        real, real_args = real_workdir(base)
        paths = {"no slurm client": hidden_slurm_path(base)}
        if shutil.which("sinfo"):
            paths = {"slurm client on PATH": os.environ["PATH"], **paths}
        _, out, err = dry_run(real, real_args, paths["no slurm client"], importtime=True)  # warm-up
        jobs, heavy = job_total(out), imported(err)
        trivial = base / "trivial"
        trivial.mkdir()
        (trivial / "Snakefile").write_text(TRIVIAL.format(jobs=jobs))
        dry_run(trivial, [], paths["no slurm client"])
        result: dict[str, Any] = {"jobs": jobs, "repeats": repeats, "parse_imports": heavy, "modes": {}}
        for mode, path in paths.items():
            times: dict[str, list[float]] = {"real": [], "trivial": []}
            for i in range(repeats):
                print(f"parse_bench: {mode}, repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
                times["real"].append(dry_run(real, real_args, path)[0])
                times["trivial"].append(dry_run(trivial, [], path)[0])
            med = {k: round(statistics.median(v), 2) for k, v in times.items()}
            result["modes"][mode] = {
                "real_s": med["real"],
                "trivial_s": med["trivial"],
                "difference_s": round(med["real"] - med["trivial"], 2),
                "all_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
            }
    return result


@cli
def main(argv: list[str] | None = None) -> int:
    """Print the medians as a table (and optionally save them as JSON)."""
    p = argparse.ArgumentParser(prog="python -m lcnn.tools.parse_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed dry runs of each Snakefile per PATH")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = run(args.repeats)
    print(f"dry run of {result['jobs']} jobs, median of {result['repeats']} (parse imports: {result['parse_imports']})")
    print(f"{'PATH':<22}{'real config s':>15}{'trivial s':>11}{'difference s':>14}")
    for mode, row in result["modes"].items():
        print(f"{mode:<22}{row['real_s']:>15}{row['trivial_s']:>11}{row['difference_s']:>14}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

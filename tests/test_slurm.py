"""The SLURM profile on a real single-node SLURM cluster (started by ``.ci/slurm-cluster.sh``).

Why: job routing (partitions, GPU types, whole-node benchmarks), retry time limits and the SLURM job ids that
results record can only be trusted once real slurmctld/slurmd/slurmdbd daemons have run them. The cluster is
started once per session; where this machine cannot host one (not root, not Debian, offline) the tests skip
with the script's one-line reason, except under ``CI=true`` where that is a failure. The session stops the
daemons it started (set ``LCNN_SLURM_KEEP=1`` to leave them running between local test runs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lcnn import owner
from lcnn.utils import LcnnError

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "slurm-cluster.sh"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TINY = REPO / "tests" / "data" / "tiny.yaml"

# Partition names deliberately differ from the profile's placeholders, so a value the override missed fails.
CLUSTER = {
    "LCNN_SLURM_CPU_PARTITION": os.environ.get("LCNN_SLURM_CPU_PARTITION", "ci-cpu"),
    "LCNN_SLURM_GPU_PARTITION": os.environ.get("LCNN_SLURM_GPU_PARTITION", "ci-gpu"),
    "LCNN_SLURM_BENCH_PARTITION": os.environ.get("LCNN_SLURM_BENCH_PARTITION", "ci-l40s"),
    "LCNN_SLURM_GPU_TYPE": os.environ.get("LCNN_SLURM_GPU_TYPE", "a100"),
    "LCNN_SLURM_BENCH_GPU_TYPE": os.environ.get("LCNN_SLURM_BENCH_GPU_TYPE", "l40s"),
    "LCNN_SLURM_ACCOUNT": os.environ.get("LCNN_SLURM_ACCOUNT", "lcnn_ci"),
    "LCNN_SLURM_NODE_CPUS": os.environ.get("LCNN_SLURM_NODE_CPUS", "32"),
}
START_TIMEOUT_S = 900  # a first start installs the Debian packages
WORKFLOW_TIMEOUT_S = int(os.environ.get("LCNN_SLURM_TEST_TIMEOUT", "900"))  # the tiny study takes ~2 min


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _slurmctld_running() -> bool:
    pid_file = Path("/run/slurmctld.pid")
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the cluster (idempotent) and yield its settings; stop what this session started."""
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    env = os.environ | CLUSTER
    was_up = _slurmctld_running()
    t0 = time.monotonic()
    proc = subprocess.run(
        ["timeout", "-k", "20", str(START_TIMEOUT_S), "bash", str(SCRIPT), "start"],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 3:
        reason = lines[-1] if lines else "cannot start a SLURM cluster here"
        if _in_ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    if proc.returncode != 0:
        pytest.fail(f".ci/slurm-cluster.sh start failed (exit {proc.returncode}):\n" + "\n".join(lines[-40:]))
    info = dict(CLUSTER, start_seconds=round(time.monotonic() - t0, 1))
    print(f"\nSLURM cluster up in {info['start_seconds']}s: {lines[-1] if lines else ''}")
    yield info
    if not was_up and not os.environ.get("LCNN_SLURM_KEEP"):
        subprocess.run(["timeout", "-k", "10", "120", "bash", str(SCRIPT), "stop"], env=env, check=False)


def make_profile(dest: Path, cluster: dict, **overrides) -> Path:
    """profiles/slurm with its anchored cluster block pointed at the test cluster; everything else verbatim.

    Only the values of the anchors in the ``x-lcnn-cluster`` block are replaced (exactly what a user edits),
    plus top-level CI-speed ``overrides`` (e.g. a 2 s first status check instead of 40 s).
    """
    anchors = {
        "account": cluster["LCNN_SLURM_ACCOUNT"],
        "cpu_partition": cluster["LCNN_SLURM_CPU_PARTITION"],
        "gpu_partition": cluster["LCNN_SLURM_GPU_PARTITION"],
        "bench_partition": cluster["LCNN_SLURM_BENCH_PARTITION"],
        "gpu_model": cluster["LCNN_SLURM_GPU_TYPE"],
        "bench_gpu_model": cluster["LCNN_SLURM_BENCH_GPU_TYPE"],
    }
    text = PROFILE.read_text()
    for name, value in anchors.items():
        text, n = re.subn(rf"(&{name}\s+)\S+", lambda m, v=value: m.group(1) + v, text)
        assert n == 1, f"anchor &{name} should be defined exactly once in {PROFILE}"
    profile = yaml.safe_load(text)
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5} | overrides)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def start_snakemake(args: list[str], cwd: Path, timeout_s: int, out) -> subprocess.Popen:
    """Start snakemake (this venv's) under ``timeout -k`` (with jobs in flight it may ignore SIGTERM), output to
    the open file ``out``."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("SLURM_JOB_ID", None)
    cmd = ["timeout", "-k", "20", str(timeout_s), sys.executable, "-m", "snakemake", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def run_snakemake(args: list[str], cwd: Path, timeout_s: int, log: Path) -> tuple[int, str, float]:
    """Run snakemake to the end; return its exit status, its log and the seconds it took."""
    t0 = time.monotonic()
    with log.open("w") as fh:
        rc = start_snakemake(args, cwd, timeout_s, fh).wait()
    return rc, log.read_text(), time.monotonic() - t0


def submitted_job_ids(snakemake_log: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", snakemake_log)


def sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Accounting records of the given jobs (allocations only, not steps), keyed by job id."""
    fields = ["JobID", "Partition", "State", "AllocCPUS", "Timelimit", "AllocTRES", "Comment", "ExitCode"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", ",".join(fields), "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.strip().splitlines()]
    return {r["JobID"]: r for r in rows}


def rule_of(row: dict[str, str]) -> str:
    """The rule a job ran: the SLURM plugin writes ``rule_<name>[_wildcards_<...>]`` as the job comment."""
    return re.sub(r"_wildcards_.*$", "", row["Comment"]).removeprefix("rule_")


def fail_msg(log_text: str, workdir: Path) -> str:
    """The snakemake log tail plus the failed jobs' SLURM and rule logs, so a CI failure explains itself."""
    parts = [log_text[-6000:]]
    for path in sorted(re.findall(r"log: (\S+\.log)", log_text))[:6]:
        p = Path(path) if Path(path).is_absolute() else workdir / path
        if p.exists():
            parts.append(f"--- {p}\n{p.read_text()[-3000:]}")
    return "\n".join(parts)


TOY_SNAKEFILE = textwrap.dedent(
    r"""
    # Same rule names as the lcnn workflow, so profiles/slurm routes each of them; shells record where they ran.
    localrules: all, collect_seeds

    WHERE = "job=${{SLURM_JOB_ID:-none}} partition=${{SLURM_JOB_PARTITION:-none}} gpus=${{CUDA_VISIBLE_DEVICES:-none}}"

    rule all:
        input: "results/report.txt"

    rule prepare_data:
        output: "data/prepared.txt"
        shell: "echo " + WHERE + " > {output}"

    rule train:
        input: "data/prepared.txt"
        output: "runs/{model}/seed{seed}.txt"
        resources: gpu=1
        # run a/seed0 fails its first attempt: the retry must get a longer time limit
        shell:
            "echo " + WHERE + " attempt_runtime={resources.runtime} > {output}; "
            "if [ {wildcards.model}{wildcards.seed} = a0 ] && [ ! -e {output}.failed ]; then "
            "touch {output}.failed; rm {output}; exit 1; fi"

    rule collect_seeds:
        input: expand("runs/{{model}}/seed{seed}.txt", seed=[0, 1])
        output: "results/{model}.txt"
        shell: "cat {input} > {output}; echo collect " + WHERE + " >> {output}"

    rule benchmark:
        input: "results/{model}.txt"
        output: "benchmarks/{model}.txt"
        resources: gpu=1
        shell: "echo " + WHERE + " > {output}"

    rule report:
        input: expand("benchmarks/{model}.txt", model=["a", "b"])
        output: "results/report.txt"
        shell: "cat {input} > {output}; echo report " + WHERE + " >> {output}"
    """
)


def test_profile_routes_rules_and_grows_time_limit_on_retry(slurm_cluster, tmp_path):
    """profiles/slurm on a toy workflow with lcnn's rule names: partitions, GPU types, exclusive benchmark
    node, local collect_seeds, and a failed training job retried with twice the time limit."""
    c = slurm_cluster
    work = tmp_path / "toy"
    work.mkdir()
    (work / "Snakefile").write_text(TOY_SNAKEFILE)
    profile = make_profile(tmp_path / "profile", c)
    rc, log, seconds = run_snakemake(["--profile", str(profile)], work, 600, tmp_path / "snakemake.log")
    print(f"toy workflow through SLURM: {seconds:.0f}s")
    assert rc == 0, fail_msg(log, work)

    jobs = sacct(submitted_job_ids(log))
    by_rule: dict[str, list[dict]] = {}
    for row in jobs.values():
        by_rule.setdefault(rule_of(row), []).append(row)
    assert sorted(by_rule) == ["benchmark", "prepare_data", "report", "train"], by_rule.keys()
    assert len(by_rule["train"]) == 5 and len(by_rule["benchmark"]) == 2  # 4 runs + 1 retry

    for row in by_rule["prepare_data"] + by_rule["report"]:
        assert row["Partition"] == c["LCNN_SLURM_CPU_PARTITION"] and row["State"] == "COMPLETED", row
    for row in by_rule["train"]:
        assert row["Partition"] == c["LCNN_SLURM_GPU_PARTITION"], row
        assert f"gres/gpu:{c['LCNN_SLURM_GPU_TYPE']}=1" in row["AllocTRES"], row
    failed = [r for r in by_rule["train"] if r["State"] != "COMPLETED"]
    assert [r["State"] for r in failed] == ["FAILED"] and failed[0]["Timelimit"] == "12:00:00", failed
    retried = [r for r in by_rule["train"] if r["Comment"] == failed[0]["Comment"] and r is not failed[0]]
    assert len(retried) == 1 and retried[0]["State"] == "COMPLETED", retried
    assert retried[0]["Timelimit"] == "1-00:00:00", "runtime: 720*attempt should double on the retry"
    for row in by_rule["benchmark"]:
        assert row["Partition"] == c["LCNN_SLURM_BENCH_PARTITION"] and row["State"] == "COMPLETED", row
        assert f"gres/gpu:{c['LCNN_SLURM_BENCH_GPU_TYPE']}=1" in row["AllocTRES"], row
        assert row["AllocCPUS"] == c["LCNN_SLURM_NODE_CPUS"], f"--exclusive should give the whole node: {row}"

    assert "collect job=none" in (work / "results" / "a.txt").read_text(), "collect_seeds is a local rule"
    assert re.search(
        r"report job=\d+ partition=" + re.escape(c["LCNN_SLURM_CPU_PARTITION"]),
        (work / "results" / "report.txt").read_text(),
    )
    logs = list((work / "logs" / "slurm").rglob("*.log"))
    assert len(logs) == len(jobs), "every job's SLURM log is kept under logs/slurm/"


def test_tiny_study_runs_every_job_on_slurm(slurm_cluster, tmp_path):
    """The real workflow (tiny config) through profiles/slurm: every training, benchmark and report job is a
    COMPLETED SLURM job in the right partition, and the results it wrote record their SLURM job ids."""
    from conftest import OVERLAYS, copy_workflow, tiny_config

    from lcnn import config as study

    cfg = tiny_config()
    runs = study.runs(cfg)
    n_runs, n_results = len(runs), len({(r["model"], r["variant"]) for r in runs})
    n_models = len(study.selected_models(cfg))
    c = slurm_cluster
    work = copy_workflow(tmp_path / "study")
    profile = make_profile(tmp_path / "profile", c)
    rc, log, seconds = run_snakemake(
        ["--profile", str(profile), "--configfile", *OVERLAYS], work, WORKFLOW_TIMEOUT_S, tmp_path / "snakemake.log"
    )
    print(f"tiny study through SLURM: {seconds:.0f}s")
    assert rc == 0, fail_msg(log, work)

    jobs = sacct(submitted_job_ids(log))
    bad = [r for r in jobs.values() if r["State"] != "COMPLETED"]
    assert not bad, f"every SLURM job should have COMPLETED on its first attempt: {bad}"
    by_rule: dict[str, list[dict]] = {}
    for row in jobs.values():
        by_rule.setdefault(rule_of(row), []).append(row)
    partition = {
        "prepare_data": c["LCNN_SLURM_CPU_PARTITION"],
        "train": c["LCNN_SLURM_GPU_PARTITION"],
        "benchmark": c["LCNN_SLURM_BENCH_PARTITION"],
        "report": c["LCNN_SLURM_CPU_PARTITION"],
    }
    assert sorted(by_rule) == sorted(partition), (
        f"rules submitted to SLURM: {sorted(by_rule)}; expected {sorted(partition)} "
        "(collect_seeds is a local rule, report a SLURM job on the CPU partition)"
    )
    for rule, rows in by_rule.items():
        assert {r["Partition"] for r in rows} == {partition[rule]}, rows
    for row in by_rule["benchmark"]:
        assert row["AllocCPUS"] == c["LCNN_SLURM_NODE_CPUS"], f"--exclusive should give the whole node: {row}"

    def slurm_id(env: dict, rule: str) -> str:
        job_id = env.get("slurm_job_id")
        assert job_id in jobs and rule_of(jobs[job_id]) == rule, f"{rule}: slurm_job_id {job_id!r} not a {rule} job"
        assert env.get("slurm_job_partition") == partition[rule], env
        return job_id

    metrics = sorted(work.glob("runs/*/*/seed*/metrics.json"))
    assert len(metrics) == len(by_rule["train"]) == n_runs, metrics
    train_ids = set()
    for path in metrics:
        m = json.loads(path.read_text())
        env = json.loads((path.parent / "env.json").read_text())
        assert m["status"] == "ok" and m["epochs_completed"] == m["epochs"], (path, m)
        assert m["slurm_job_id"] == slurm_id(env, "train"), (path, m["slurm_job_id"], env["slurm_job_id"])
        train_ids.add(m["slurm_job_id"])
    assert len(train_ids) == n_runs, "each run is its own SLURM job"
    results = sorted(p for p in work.glob("results/*/*.json") if p.parent.name != "report")
    assert len(results) == n_results, results
    assert all(json.loads(p.read_text())["status"] == "ok" for p in results), results

    benches = sorted(work.glob("benchmarks/*.json"))
    assert len(benches) == len(by_rule["benchmark"]) == n_models, benches
    for path in benches:
        b = json.loads(path.read_text())
        slurm_id(b["env"], "benchmark")
        assert any(row["status"] == "ok" for row in b["rows"]), path

    summary = json.loads((work / "results" / "report" / "summary.json").read_text())
    assert "env" in summary, "results/report/summary.json should record lcnn.utils.environment() as 'env'"
    slurm_id(summary["env"], "report")
    assert summary["runs"] == {"total": n_runs, "ok": n_runs, "diverged": 0}, summary["runs"]


PREEMPT_OVERLAY = {  # one training run, long enough (4 epochs of 15 steps at 96 px) to be signalled mid-epoch
    "baseline": {"epochs": 4, "batch_size": 8, "img_size": 96},
    "train": {"log_every": 1},
}


def test_training_job_signalled_by_slurm_saves_state_and_its_retry_resumes(slurm_cluster, tmp_path):
    """What the profile's --signal=TERM@120 (or a preemption) does to a real training job: SLURM signals the job
    step, the trainer saves its state and exits 75, the job fails, and Snakemake's retry (a new SLURM job with a
    longer time limit) resumes from that state instead of starting over."""
    from conftest import OVERLAYS, copy_workflow

    c = slurm_cluster
    work = copy_workflow(tmp_path / "study")
    (work / "preempt.yaml").write_text(yaml.safe_dump(PREEMPT_OVERLAY))
    profile = make_profile(tmp_path / "profile", c)
    target = "runs/mobilenetv3_l/baseline/seed0/metrics.json"
    rule_log = work / "logs/train/mobilenetv3_l/baseline/seed0.log"
    args = ["--profile", str(profile), "--configfile", *OVERLAYS, "preempt.yaml", "--", target]
    log_path = tmp_path / "snakemake.log"
    with log_path.open("w") as fh:
        proc = start_snakemake(args, work, WORKFLOW_TIMEOUT_S, fh)
        signalled = None
        deadline = time.monotonic() + WORKFLOW_TIMEOUT_S
        while signalled is None and proc.poll() is None and time.monotonic() < deadline:
            text = rule_log.read_text() if rule_log.exists() else ""
            if "epoch 2 step 3/" in text:  # line-buffered progress: the job is mid-epoch right now
                signalled = submitted_job_ids(log_path.read_text())[-1]
                # like --signal=TERM@120: the job step's processes, not the batch shell
                subprocess.run(["scancel", "--signal=TERM", signalled], check=True)
            time.sleep(0.2)
        rc = proc.wait()
    log = log_path.read_text()
    assert signalled, "the training job never reached epoch 2:\n" + fail_msg(log, work)
    assert rc == 0, fail_msg(log, work)

    jobs = sacct(submitted_job_ids(log))
    train = [r for r in jobs.values() if rule_of(r) == "train"]
    assert [r["State"] for r in train] == ["FAILED", "COMPLETED"], train
    assert train[0]["JobID"] == signalled and train[1]["Timelimit"] == "1-00:00:00", train
    text = rule_log.read_text()  # the retry's log (the same path)
    assert re.search(r"resuming at epoch 2 step \d+", text), text[-2000:]
    metrics = json.loads((work / target).read_text())
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 4, metrics
    assert metrics["slurm_job_id"] == train[1]["JobID"], metrics
    assert not (work / target).with_name("train_state").exists(), "the state is cleaned up after success"


def test_a_run_owned_by_a_live_slurm_job_is_refused_until_that_job_ends(slurm_cluster, tmp_path):
    """The twin guard's SLURM side (lcnn.owner): a run folder whose owner.json names another job that squeue still
    lists is refused in one line; once that job is cancelled, the folder is free."""
    c = slurm_cluster
    submit = ["sbatch", "--parsable", "-A", c["LCNN_SLURM_ACCOUNT"], "-p", c["LCNN_SLURM_CPU_PARTITION"]]
    job = subprocess.run([*submit, "--wrap", "sleep 300"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        (tmp_path / owner.OWNER).write_text(json.dumps({"slurm_job_id": job, "host": "node", "pid": 1, "start": 0}))
        assert owner.slurm_job_live(job)
        with pytest.raises(LcnnError, match=f"is being trained by SLURM job {job} on node, which is still running"):
            owner.claim(tmp_path)
    finally:
        subprocess.run(["scancel", job], check=True)
    deadline = time.monotonic() + 60
    while owner.slurm_job_live(job):  # CANCELLED, then gone from squeue (COMPLETING counts as ended)
        assert time.monotonic() < deadline, f"job {job} still listed by squeue a minute after scancel"
        time.sleep(1)
    owner.claim(tmp_path)
    assert json.loads((tmp_path / owner.OWNER).read_text())["pid"] == os.getpid()


def test_a_snakemake_started_while_its_studys_jobs_still_wait_stops_before_submitting(slurm_cluster, tmp_path):
    """A Snakemake restarted while an earlier one's jobs still wait would submit them again, and a twin that starts
    after its first has finished trains the run a second time (no state is left to resume, no owner to refuse it).
    So the main Snakemake stops before submitting anything, naming the job; a dry run, and another study's jobs,
    are not stopped."""
    from conftest import OVERLAYS, copy_workflow

    c = slurm_cluster
    work = copy_workflow(tmp_path / "study")
    other = tmp_path / "other_study"
    other.mkdir()
    submit = ["sbatch", "--parsable", "-A", c["LCNN_SLURM_ACCOUNT"], "-p", c["LCNN_SLURM_CPU_PARTITION"]]
    comment = "rule_train_wildcards_mobilenetv3_l_baseline_0"  # as the SLURM executor plugin names its jobs
    jobs = [
        subprocess.run(
            [*submit, "-D", str(where), "--comment", comment, "--wrap", "sleep 300"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for where in (work, other)
    ]
    try:
        listed = owner.study_jobs(work)  # the other study's job is not this one's
        assert len(listed) == 1 and listed[0].startswith(f"{jobs[0]} train_wildcards_mobilenetv3_l_baseline_0 ("), (
            listed
        )
        profile = make_profile(tmp_path / "profile", c)
        args = ["--profile", str(profile), "--configfile", *OVERLAYS]
        rc, log, _ = run_snakemake([*args, "-n"], work, 300, tmp_path / "dry.log")
        assert rc == 0, fail_msg(log, work)  # looking is not submitting
        rc, log, _ = run_snakemake(args, work, 300, tmp_path / "snakemake.log")
        assert rc != 0 and f"lcnn: 1 SLURM jobs of this study are still queued or running ({jobs[0]} train" in log
        assert not submitted_job_ids(log) and not (work / "runs").exists()
    finally:
        subprocess.run(["scancel", *jobs], check=True)

"""The fork server (`make demo`): a trainer forked from a warm process must be the job's trainer in every way.

Real processes throughout: the server runs the launcher exactly as the train rule does, the launcher asks the server
for the trainer, and each test compares with a trainer the launcher started as a new process, or sends the signals
that Snakemake, SLURM and the kernel send.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, rule_args, start_logged, tiny_config, wait_until
from safetensors.torch import load_file

from lcnn import checkpoint, forkserver, launch
from lcnn import config as study

pytestmark = pytest.mark.slow

MODEL = "mobilenetv3_l"
SERVER = [sys.executable, "-m", "lcnn.forkserver", "--"]


def launcher(cfg: dict, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lcnn.launch", "--nproc", "1", "--", *rule_args(cfg, MODEL, study.BASELINE, out_dir)]


@pytest.fixture(scope="module")
def cfg(built_data) -> dict:
    cfg = tiny_config(built_data)
    cfg["baseline"].update(batch_size=8, epochs=2)
    cfg["train"].update(log_every=1, num_workers=1)  # a persistent loader worker, forked by the forked trainer
    return cfg


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    return start_logged(cmd, {**os.environ, "OMP_NUM_THREADS": "1", **env}, log)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def forked_by(server: subprocess.Popen) -> tuple[int, int]:
    """The server's two children: the launcher it runs as its command, and the trainer it forked (which, as a fork,
    shows the server's command line)."""
    kids = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in children(server.pid)}
    (launcher_pid,) = (p for p, cmd in kids.items() if b"lcnn.forkserver" not in cmd)
    (trainer_pid,) = (p for p, cmd in kids.items() if b"lcnn.forkserver" in cmd)
    return launcher_pid, trainer_pid


def same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    same = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "history.csv")[same], pd.read_csv(b / "history.csv")[same])


@pytest.fixture(scope="module")
def plain(cfg, tmp_path_factory) -> Path:
    """A trainer started as a new process, by a launcher whose fork server cannot be reached (a job on another node):
    one warning line, then the usual way."""
    base = tmp_path_factory.mktemp("plain")
    log = base / "log"
    proc = start(launcher(cfg, base / "run"), log, **{forkserver.FORKSERVER_ENV: str(base / "no-such-socket")})
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    (warning,) = [line for line in log.read_text().splitlines() if line.startswith("lcnn launch:")]
    assert "cannot reach the fork server" in warning and "starting the trainer as a new process" in warning
    return base / "run"


@pytest.fixture(scope="module")
def forked(cfg, tmp_path_factory) -> dict:
    """The same job, its trainer forked by the server; the server's environment has its own thread count."""
    base = tmp_path_factory.mktemp("forked")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the server's torch reads 2; the job asks for 1
    cmd = [*SERVER, "env", "OMP_NUM_THREADS=1", *launcher(cfg, base / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": base / "run", "stdout": proc.stdout, "stderr": proc.stderr}


def test_a_forked_trainer_trains_exactly_as_a_new_process(plain, forked):
    same_run(plain, forked["out"])
    assert forked["stderr"].strip().splitlines()[-1] == "lcnn forkserver: started 1 trainers warm"
    assert f"[{MODEL}/baseline/seed0] epoch 2/2" in forked["stdout"]  # the launcher's streams are the trainer's
    assert json.loads((forked["out"] / "env.json").read_text())["cpu_threads"] == 1  # the job's OMP_NUM_THREADS
    metrics = json.loads((forked["out"] / "metrics.json").read_text())
    assert metrics["status"] == "ok"


def test_a_stop_signal_to_the_launcher_reaches_the_forked_trainer_and_the_retry_ends_the_same(cfg, plain, tmp_path):
    """SIGTERM to the launcher alone (the forked trainer is in a process group of its own): the launcher forwards
    it, the trainer saves its state and exits 75, and the launcher exits 75 so Snakemake's retry resumes."""
    out, log = tmp_path / "run", tmp_path / "log"
    server = start([*SERVER, *launcher(cfg, out)], log)
    wait_until(lambda: "epoch 1 step 3/" in log.read_text(), server, log)
    os.kill(forked_by(server)[0], signal.SIGTERM)
    assert server.wait(timeout=300) == launch.EXIT_PREEMPTED, log.read_text()[-3000:]
    assert "saved state at epoch 1" in log.read_text()
    assert checkpoint.find(out) is not None and not (out / "metrics.json").exists()

    retry = start([*SERVER, *launcher(cfg, out)], tmp_path / "retry.log")
    assert retry.wait(timeout=600) == 0, (tmp_path / "retry.log").read_text()[-3000:]
    assert "resuming at epoch 1 step" in (tmp_path / "retry.log").read_text()
    same_run(plain, out)


def test_a_trainer_whose_launcher_was_killed_saves_its_state_and_stops(cfg, tmp_path):
    """Snakemake or SLURM SIGKILLs the launcher: nobody is left to stop its trainer but the server, which sends it
    SIGTERM; it saves its state, and the server ends with its command."""
    out, log = tmp_path / "run", tmp_path / "log"
    server = start([*SERVER, *launcher(cfg, out)], log)
    wait_until(lambda: "epoch 1 step 3/" in log.read_text(), server, log)
    launcher_pid, trainer = forked_by(server)
    os.kill(launcher_pid, signal.SIGKILL)
    assert server.wait(timeout=300) == 128 + signal.SIGKILL
    assert "saved state at epoch 1" in log.read_text()
    assert checkpoint.find(out) is not None
    assert not Path(f"/proc/{trainer}").exists()  # reaped: no orphan keeps training


def test_a_forked_trainer_killed_by_a_signal_is_reported_as_one_the_launcher_started(cfg, tmp_path):
    log = tmp_path / "log"
    server = start([*SERVER, *launcher(cfg, tmp_path / "run")], log)
    wait_until(lambda: "epoch 1 step 2/" in log.read_text(), server, log)
    os.kill(forked_by(server)[1], signal.SIGSEGV)
    assert server.wait(timeout=120) == 128 + signal.SIGSEGV
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text  # faulthandler wrote to the job's log
    (last,) = [line for line in text.splitlines() if line.startswith("lcnn launch:")]
    assert "died by SIGSEGV" in last and "resumes from the last saved epoch" in last


def test_a_forked_trainers_error_is_its_one_line_and_status_and_the_server_serves_on(cfg, tmp_path):
    """A trainer that fails runs the exit handlers it inherited from the server: none of them may stop the server
    (a TemporaryDirectory's finalizer once removed its socket, so every later job fell back to a new process)."""
    cfg = {**cfg, "data": {**cfg["data"], "root": str(tmp_path / "not_prepared")}}
    one = shlex.join(launcher(cfg, tmp_path / "run"))
    proc = subprocess.run(
        [*SERVER, "sh", "-c", f"{one}; {one}"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lcnn error:")]
    assert len(errors) == 2 and all("train.csv does not exist; prepare the data first" in e for e in errors)
    assert "lcnn launch:" not in proc.stderr  # neither fell back to a new process
    assert proc.stderr.strip().splitlines()[-1] == "lcnn forkserver: started 2 trainers warm"


def test_a_slurm_job_never_uses_the_server(cfg, tmp_path):
    """sbatch exports the environment: a SLURM job's trainer must stay in the job's own allocation and cgroup."""
    cfg = {**cfg, "data": {**cfg["data"], "root": str(tmp_path / "not_prepared")}}
    proc = subprocess.run(
        [*SERVER, "env", "SLURM_JOB_ID=1", *launcher(cfg, tmp_path / "run")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "train.csv does not exist" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "lcnn forkserver: started 0 trainers warm"


def test_a_trainer_whose_server_died_is_waited_for_before_the_launcher_fails(cfg, tmp_path):
    """SIGKILL to the server: the kernel sends the trainer SIGTERM, it saves its state, and only then does the
    launcher exit (status 1, one line), so Snakemake's retry never trains beside it in the same folder."""
    out, log = tmp_path / "run", tmp_path / "log"
    server = start([*SERVER, *launcher(cfg, out)], log)
    wait_until(lambda: "epoch 1 step 3/" in log.read_text(), server, log)
    launcher_pid, trainer = forked_by(server)
    server.kill()
    server.wait(timeout=30)
    deadline = time.monotonic() + 300
    while "outcome is unknown" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    assert not Path(f"/proc/{trainer}").exists() or "State:\tZ" in Path(f"/proc/{trainer}/status").read_text()
    text = log.read_text()
    assert "saved state at epoch 1" in text and text.index("saved state") < text.index("outcome is unknown")
    assert checkpoint.find(out) is not None
    (last,) = [line for line in text.splitlines() if line.startswith("lcnn launch:")]
    assert "the fork server ended before trainer pid" in last and "a retry resumes" in last


def test_the_server_refuses_what_a_fork_cannot_give_as_a_new_process_would():
    """Another module, a job without a thread count, another umask: each is refused, so the launcher starts the
    trainer as a new process."""
    client = """
import os
from lcnn import forkserver as f
path, env = os.environ[f.FORKSERVER_ENV], {**os.environ, "OMP_NUM_THREADS": "1"}
for module, job_env in (("os", env), ("lcnn.train", {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"})):
    try:
        f.start(path, module, [], job_env)
    except f.ForkServerError as err:
        print(err)
os.umask(0o077)
try:
    f.start(path, "lcnn.train", [], env)
except f.ForkServerError as err:
    print(err)
"""
    proc = subprocess.run(
        [*SERVER, sys.executable, "-c", client], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all("did not start" in line for line in lines)
    assert "it serves lcnn.train" in lines[0]
    assert "OMP_NUM_THREADS is ''" in lines[1]
    assert "the job's umask 077 is not the server's" in lines[2]
    assert proc.stderr.strip().splitlines()[-1] == "lcnn forkserver: started 0 trainers warm"


def scripted_server(tmp_path: Path, reply) -> tuple[str, threading.Thread]:
    """A stand-in for the server that reads one request as the server does, then answers it with ``reply(conn)``:
    the timing of its two lines is the test's to choose."""
    path = str(tmp_path / "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve_one() -> None:
        conn, _ = listener.accept()
        header, fds, _, _ = socket.recv_fds(conn, 4, 3)
        for fd in fds:
            os.close(fd)
        size = int.from_bytes(header, "big")
        while size:
            size -= len(conn.recv(size))
        reply(conn)
        conn.close()

    thread = threading.Thread(target=serve_one)
    thread.start()
    return path, thread


def test_a_stop_signal_during_the_handshake_reaches_the_trainer(tmp_path):
    """SIGTERM to the launcher while the server has not yet said which pid it forked (a busy server) must reach
    the trainer once it has, not vanish: else a preempted or cancelled job trains on to the end."""
    victim = subprocess.Popen(["sleep", "120"])  # stands in for the forked trainer: it dies of SIGTERM
    asked = threading.Event()

    def slow_reply(conn: socket.socket) -> None:
        asked.set()
        time.sleep(2)  # the launcher is signalled meanwhile
        conn.sendall(f"pid {victim.pid}\n".encode())
        conn.sendall(f"exit {victim.wait(timeout=60)}\n".encode())

    path, server = scripted_server(tmp_path, slow_reply)
    env = {**os.environ, forkserver.FORKSERVER_ENV: path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcnn.launch", "--", "--out-dir", str(tmp_path)],
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert asked.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        victim.kill()
        server.join(timeout=60)
    assert "died by SIGTERM" in proc.stderr.read()


def test_a_trainer_that_ends_at_once_reports_its_status(tmp_path):
    """The server's two lines ("pid", then "exit") can arrive together; the launcher must not lose the second."""
    path, server = scripted_server(tmp_path, lambda conn: conn.sendall(b"pid 12345\nexit 75\n"))
    proc = forkserver.start(path, "lcnn.train", [], {})
    server.join(timeout=10)
    assert proc.pid == 12345 and proc.wait() == launch.EXIT_PREEMPTED


def test_the_launcher_signals_the_process_the_server_forked_even_if_its_pid_now_names_another(tmp_path):
    """The server sends a pidfd with the pid, opened before it could reap the trainer: a signal goes to the trainer
    it names, never to a process that reused the pid. Here the pid line names a bystander, as a reused pid would."""
    trainer, bystander = subprocess.Popen(["sleep", "120"]), subprocess.Popen(["sleep", "120"])

    def reply(conn: socket.socket) -> None:
        pidfd = os.pidfd_open(trainer.pid)
        socket.send_fds(conn, [f"pid {bystander.pid}\n".encode()], [pidfd])
        os.close(pidfd)
        try:
            code = trainer.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the signal went elsewhere: say the trainer ended well, to fail the test
            code = 0
        conn.sendall(f"exit {code}\n".encode())

    path, server = scripted_server(tmp_path, reply)
    try:
        proc = forkserver.start(path, "lcnn.train", [], {})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == -signal.SIGTERM
        assert trainer.returncode == -signal.SIGTERM and bystander.poll() is None
    finally:
        trainer.kill()
        bystander.kill()
        server.join(timeout=60)


@pytest.mark.parametrize(("command", "message"), [([], "no command"), (["--", "no-such-tool"], "cannot run")])
def test_no_command_is_a_one_line_usage_error(command, message):
    proc = subprocess.run([*SERVER[:-1], *command], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]


def test_the_tiny_study_through_snakemake_forks_every_trainer(tiny_study):
    """`make demo`'s path: snakemake's shell runs the launcher, which reaches the server; every trainer is forked."""
    trainers = len(list(tiny_study.glob("runs/*/*/seed*/metrics.json")))
    assert trainers == 4
    last = (tiny_study / "snakemake.stderr").read_text().strip().splitlines()[-1]
    assert last == f"lcnn forkserver: started {trainers} trainers warm"
    assert not any("lcnn launch:" in log.read_text() for log in tiny_study.glob("logs/train/*/*/*.log"))

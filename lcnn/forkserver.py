"""Start the trainer of a local job from a warm process: a fork server for runs on this machine (``make demo``).

Before its first step, every training job imports torch, torchvision (whose ops import ``torch._dynamo``) and timm:
about 3 s of a 13 s demo job, paid 70 times by the demo. ``python -m lcnn.forkserver -- COMMAND`` imports them
once, then runs COMMAND (``snakemake --profile profiles/demo``) with :data:`FORKSERVER_ENV` naming its Unix
socket; :mod:`lcnn.launch` asks it for each one-process trainer, and it forks one. The design is that of
multiprocessing's ``forkserver`` start method: a single-threaded server that has imported the modules and forks on
request, as DataLoader forks its workers from a process that has imported torch.

The forked trainer is the job's own: the launcher's standard streams (so its log), working directory, environment,
umask and ``OMP_NUM_THREADS`` (torch's thread count); the stop signals the launcher receives, forwarded; its exit
status, a death by a signal included, reported back to the launcher, which reports it as for a trainer it started
itself. It runs the module as ``python -m`` does. A trainer whose launcher vanished (SIGKILL) gets SIGTERM, so it
saves its state, and SIGKILL :data:`ORPHAN_GRACE_S` later; a trainer whose server died gets SIGTERM from the kernel.

Only for jobs on this machine: a launcher that cannot reach the socket (a job on another node, a server that
failed to import torch) starts the trainer as usual after one warning line. Jobs on SLURM never use it.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib
import io
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FORKSERVER_ENV = "LCNN_FORKSERVER"  # the socket's path, in COMMAND's environment
SERVED = ("lcnn.train",)  # the modules a client may run, imported before the first fork
ORPHAN_GRACE_S = 120.0  # a trainer saves its state within this of SIGTERM (launch.SHUTDOWN_TIMEOUT_S and margin)
POLL_S = 0.05  # how often the server reaps its children
_HEADER = struct.Struct("!I")  # the request's length, before its JSON
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}  # what the server handles or ignores


class ForkServerError(OSError):
    """The fork server could not be reached, or ended before it reported the trainer's exit."""


# --- client (lcnn.launch): imports nothing heavy ---


class RemoteProcess:
    """A trainer forked by the server: ``pid``, ``send_signal`` and ``wait`` as for a ``subprocess.Popen``.

    It is not this process's child, so it is held by a pidfd where Linux has them, the one the server opened before
    it could reap the trainer: a signal never reaches another process that reused the pid, and when the server is
    lost, :meth:`wait` still waits for the trainer to end.
    """

    def __init__(self, sock: socket.socket, reader: Any, pid: int, pidfd: int | None = None):
        self.pid = pid
        self.returncode: int | None = None
        self._sock, self._reader = sock, reader  # one reader: its buffer may already hold the exit line
        self._pidfd = pidfd if pidfd is not None else _pidfd_open(pid)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:  # it has just ended; wait() reports how
                pass

    def wait(self) -> int:
        """Block until the trainer ends; its status as ``Popen.wait`` gives it (negative: killed by that signal).

        Raises ForkServerError if the server ended first, once the trainer has ended too (the kernel sent it SIGTERM
        when the server died, and it may take a while to save its state): a retry never trains beside it.
        """
        if self.returncode is None:
            line = self._reader.readline()  # interrupted by a signal, it retries after the handler (PEP 475)
            self._reader.close()
            self._sock.close()
            try:
                if not line.startswith("exit "):
                    self._wait_gone()
                    raise ForkServerError(f"the fork server ended before trainer pid {self.pid} did")
                self.returncode = int(line.split()[1])
            finally:
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        return self.returncode

    def _wait_gone(self) -> None:
        if self._pidfd is not None:
            select.select([self._pidfd], [], [])  # readable once the process has ended
            return
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(POLL_S)


def start(path: str, module: str, argv: Sequence[str], env: dict[str, str]) -> RemoteProcess:
    """Ask the server at ``path`` to run ``python -m module *argv`` with this process's streams, cwd and ``env``."""
    request = {"module": module, "argv": list(argv), "cwd": os.getcwd(), "env": env, "umask": _umask()}
    body = json.dumps(request).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        socket.send_fds(sock, [_HEADER.pack(len(body))], [0, 1, 2])
        sock.sendall(body)
        reply, pidfds = _first_line(sock)
    except OSError as err:
        sock.close()
        raise ForkServerError(f"cannot reach the fork server at {path}: {err}") from err
    if not reply.startswith("pid "):
        for fd in pidfds:
            os.close(fd)
        sock.close()
        raise ForkServerError(f"the fork server at {path} did not start {module}: {reply.strip() or 'no reply'}")
    for fd in pidfds[1:]:
        os.close(fd)
    reader = sock.makefile("r", encoding="utf-8")
    return RemoteProcess(sock, reader, int(reply.split()[1]), pidfds[0] if pidfds else None)


def _first_line(sock: socket.socket) -> tuple[str, list[int]]:
    """The server's first line and the descriptors sent with it (the trainer's pidfd), a byte at a time: what
    follows the line (the exit line) stays in the socket for the reader made next."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        byte, got, _, _ = socket.recv_fds(sock, 1, 1)
        for fd in got:
            os.set_inheritable(fd, False)  # received descriptors arrive inheritable
        fds += got
        if not byte:
            break
        data += byte
    return data.decode("utf-8", "replace"), fds


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+), or it has ended already
        return None


def _umask() -> int:
    """This process's umask. lcnn.utils has the same three lines; importing it would add 30 ms to every launcher."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- server ---


@dataclass
class _Child:
    conn: socket.socket | None  # None once its launcher is gone
    kill_at: float = field(default=float("inf"))


class _Server:
    def __init__(self, listener: socket.socket):
        self.listener: socket.socket | None = listener
        self.children: dict[int, _Child] = {}
        self.started = 0

    def serve(self, command: subprocess.Popen) -> None:
        """Serve until ``command`` ends; then stop the trainers it left, as a save-and-exit."""
        while command.poll() is None:
            self._step()
        self.stop_all()

    def stop_all(self) -> None:
        """Fork no more; stop every trainer as one whose launcher is gone (a launcher still waiting was left by its
        command), and reap them all."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for pid, child in self.children.items():
            self._orphan(pid, child)
        while self.children:
            self._step()

    def _step(self) -> None:
        waiting = [c.conn for c in self.children.values() if c.conn is not None]
        listening = [self.listener] if self.listener is not None else []
        readable, _, _ = select.select([*listening, *waiting], [], [], POLL_S)
        for sock in readable:
            if sock is self.listener:
                self._accept()
            else:  # a launcher sends nothing after its request: readable means it is gone
                pid = next(p for p, c in self.children.items() if c.conn is sock)
                self._orphan(pid, self.children[pid])
        now = time.monotonic()
        for pid, child in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self._report(child, os.waitstatus_to_exitcode(status))
                del self.children[pid]
            elif now >= child.kill_at:
                os.kill(pid, signal.SIGKILL)
                child.kill_at = float("inf")

    def _orphan(self, pid: int, child: _Child) -> None:
        """Its launcher is gone, so nobody can stop it: SIGTERM (it saves its state), SIGKILL after the grace."""
        if child.conn is not None:
            child.conn.close()
            child.conn = None
            os.kill(pid, signal.SIGTERM)
            child.kill_at = time.monotonic() + ORPHAN_GRACE_S

    def _report(self, child: _Child, code: int) -> None:
        if child.conn is not None:
            try:
                child.conn.sendall(f"exit {code}\n".encode())
            except OSError:
                pass
            child.conn.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # out of file descriptors, or the client gave up: it falls back to a new process
            return
        fds: list[int] = []
        try:
            conn.settimeout(10)
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            (size,) = _HEADER.unpack(header)
            body = b""
            while len(body) < size:
                chunk = conn.recv(size - len(body))
                if not chunk:
                    raise ConnectionError("the request ended early")
                body += chunk
            request = json.loads(body)
            _check(request, fds)
            conn.settimeout(None)
            pid = self._fork(conn, request, fds)
        except Exception as err:  # noqa: BLE001 - a bad request is refused; the server serves on
            try:
                conn.sendall(f"error {err}\n".encode())
            except OSError:
                pass
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = child = _Child(conn)
        self.started += 1
        # with the pid, a pidfd of the trainer, opened while it is an unreaped child of this process: its pid cannot
        # have been reused yet, so the launcher's signals reach the trainer and nothing else
        pidfd = _pidfd_open(pid)
        try:
            socket.send_fds(conn, [f"pid {pid}\n".encode()], [pidfd] if pidfd is not None else [])
        except OSError:  # its launcher is already gone
            self._orphan(pid, child)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _fork(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> int:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        server = os.getpid()
        # a stop signal that reaches the child before it has the trainer's handlers waits, instead of running the
        # server's (which would signal COMMAND) or being ignored (the server ignores SIGINT)
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == server:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if pid:
            return pid
        try:  # the child: from here on it is the trainer, and it never returns into the server
            for sock in (self.listener, conn, *(c.conn for c in self.children.values())):
                if sock is not None:
                    sock.close()
            _become(request, fds, server)
        except BaseException:
            traceback.print_exc()
            os._exit(1)


def _become(request: dict[str, Any], fds: list[int], server: int) -> None:
    """Turn this fresh fork into ``python -m module *argv`` as the launcher would have started it; never return."""
    os.setpgid(0, 0)  # its own process group: the launcher forwards the signals its group receives
    if sys.platform.startswith("linux"):  # the server gone (SIGKILL), the kernel sends SIGTERM: it saves and exits
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != server:
            os._exit(1)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    tempfile.tempdir = None  # found again from the job's TMPDIR
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout = _stream(1, sys.stdout, line_buffering=os.isatty(1), unbuffered=unbuffered)
    sys.stderr = _stream(2, sys.stderr, line_buffering=True, unbuffered=unbuffered)
    if "torch" in sys.modules:  # OpenMP read OMP_NUM_THREADS when the server loaded torch
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    module = request["module"]
    sys.path[0] = request["cwd"]  # as `python -m` sets it
    sys.argv = [module, *request["argv"]]  # runpy puts the module's file first
    code = 0
    try:
        # a stop signal sent meanwhile is delivered now: before the trainer has its handlers it ends the trainer as
        # it would end a new process that is still importing (Ctrl-C as KeyboardInterrupt, below)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # die by SIGINT, as Python does after an uncaught Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish()
    os._exit(code)


def _stream(fd: int, old: Any, line_buffering: bool, unbuffered: bool) -> io.TextIOWrapper:
    """A standard stream on ``fd`` buffered as a new interpreter with the job's environment buffers it."""
    old.flush()
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        raw if unbuffered else io.BufferedWriter(raw),
        encoding=old.encoding,
        errors=old.errors,
        line_buffering=line_buffering,
        write_through=unbuffered,
    )


def _check(request: dict[str, Any], fds: list[int]) -> None:
    """Refuse what a fork cannot give a job as a new process would have it; the launcher then starts one."""
    if request["module"] not in SERVED or len(fds) != 3:
        raise ValueError(f"it serves {', '.join(SERVED)} with 3 streams, not {request['module']}")
    threads = request["env"].get("OMP_NUM_THREADS", "")
    if not (threads.isdigit() and int(threads) > 0):  # the train rule always sets it
        raise ValueError(f"OMP_NUM_THREADS is {threads!r}, not a thread count it can apply")
    if request["umask"] != _umask():  # output files take their mode from the umask the server's modules read
        raise ValueError(f"the job's umask {request['umask']:03o} is not the server's {_umask():03o}")


def _exit_code(code: object) -> int:
    """The status of ``SystemExit(code)``, as the interpreter computes it (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish() -> None:
    threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then the atexit handlers
    atexit._run_exitfuncs()  # (the loaders' worker cleanup, logging.shutdown)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass


def _preload(modules: Sequence[str]) -> bool:
    """Import the served modules, then forget each of them (its dependencies stay), so that runpy runs it fresh."""
    try:
        for name in modules:
            importlib.import_module(name)
            del sys.modules[name]
    except Exception as err:  # noqa: BLE001 - any failure means: serve nothing, let the jobs start the usual way
        _say(f"cannot import {name} ({type(err).__name__}: {err}); every job starts the usual way")
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a CUDA context does not survive fork
        _say("torch initialised CUDA during the imports; every job starts the usual way")
        return False
    return True


def _say(what: str) -> None:
    print(f"lcnn forkserver: {what}", file=sys.stderr, flush=True)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg["command"]`` with a fork server for its trainers; return its exit status and the trainers started."""
    folder = tempfile.mkdtemp(prefix="lcnn-forkserver-")  # 0700: only this user can connect
    server_pid = os.getpid()
    try:
        path = os.path.join(folder, "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)  # a launcher that connects during the imports waits in the backlog
        command = subprocess.Popen(list(cfg["command"]), env={**os.environ, FORKSERVER_ENV: path})
        for sig in (signal.SIGINT, signal.SIGUSR1):  # a group's signal reaches COMMAND too: serve until it stops
            signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda sig, _: command.send_signal(sig))
        server = _Server(listener)
        try:
            if _preload(cfg.get("preload", SERVED)):
                server.serve(command)
            else:
                listener.close()  # refused: launchers start their trainers the usual way
                command.wait()
        except BaseException:  # the server failed: stop COMMAND, then its trainers (they save), rather than leave them
            command.terminate()
            try:
                server.stop_all()
            finally:
                command.wait()
            raise
    finally:
        if os.getpid() == server_pid:  # never from a trainer's exit (a TemporaryDirectory's finalizer would be)
            shutil.rmtree(folder, ignore_errors=True)
    return {"returncode": command.returncode, "started": server.started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run COMMAND (snakemake on this machine) with its trainers forked from a warm process.",
        usage="python -m lcnn.forkserver -- COMMAND [ARG ...]",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error(
            "no command: give it after --, e.g. python -m lcnn.forkserver -- snakemake --profile profiles/demo"
        )
    if shutil.which(command[0]) is None:
        parser.error(f"cannot run {command[0]!r}: no such program; give the command's path or put it on PATH")
    result = run({"command": command})
    _say(f"started {result['started']} trainers warm")
    code = result["returncode"]
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()

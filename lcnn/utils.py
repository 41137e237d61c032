"""Small helpers shared by every stage: atomic writes, the run environment and one-line CLI errors."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn


class LcnnError(Exception):
    """An error the user can fix; the CLI prints it as one line naming the problem and the fix."""


def cli(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``main()`` so that an :class:`LcnnError` becomes one line on stderr and exit status 2.

    Output is line-buffered, so a job's log file (``tail -f logs/...``) shows each progress line as it happens.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)
        try:
            return func(*args, **kwargs)
        except LcnnError as err:
            print(f"lcnn error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def kill_children() -> None:
    """SIGKILL this process's live multiprocessing children and reap them.

    They are DataLoader workers, which ignore SIGTERM (``recipe._loader_worker_init``) and hold nothing to save: a
    SIGTERM and a join, as the interpreter's exit does, would wait on each of them. torch's SIGCHLD handler, which
    turns a worker's death by a signal into an error in its loader's process, is put back to the default first.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def exit_now(status: int = 0) -> NoReturn:
    """End a stage's process once its work is written, skipping the interpreter's teardown.

    A job that imported torch and timm spends about a second tearing their modules and objects down at exit (1.0 s
    per demo training job, measured A/B), and a study of hundreds of short jobs pays it every time. Nothing is lost
    by skipping it: every output is already written atomically and the trackers were closed
    (``Accelerator.end_training``). Here the standard streams and logging are flushed, and loader worker processes
    still alive are killed. Only for ``__main__``: in any other process (a test calling ``main()``) it would end
    that process too. An error exits as before (a traceback, ``SystemExit`` with :func:`cli`'s status 2 or a
    preempted trainer's 75, and teardown), since only a ``main()`` that returned reaches this call. Under a
    profiler or tracer (``python -m cProfile``, coverage) it exits the usual way, so their exit handlers still write
    what they measured.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    logging.shutdown()
    kill_children()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the mode an ordinary open() would give them, so a shared results
# folder stays readable by the group on a cluster. Read once: os.umask can only be read by setting it.
_FILE_MODE = 0o666 & ~_umask()
_HOST_TAG = hashlib.sha1(platform.node().encode()).hexdigest()[:8]
_TMP_RE = re.compile(r"^\..+\.(\d+)-([0-9a-f]{8})\.[^.]+\.tmp$")  # .{name}.{pid}-{host}.{random}.tmp
_SWEPT: set[Path] = set()


def _sweep_stale_tmps(folder: Path) -> None:
    """Delete temp files left in ``folder`` by writers on this host that were killed mid-write (SIGKILL, OOM).

    Only files named by :func:`_atomic` whose process is gone are removed, so a concurrent writer is never
    disturbed; each folder is swept once per process, which keeps many small writes (the data stage) cheap.
    """
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if not match or match[2] != _HOST_TAG or int(match[1]) == os.getpid() or _alive(int(match[1])):
            continue
        Path(entry.path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the pid exists but belongs to someone else
        return True
    return True


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file in the same directory, then rename.

    A reader (or Snakemake) therefore sees either the old file, no file, or the complete new one. The
    temporary name starts with "." and ends with ".tmp", so no output pattern or glob mistakes it for a
    result; temporaries of killed writers are swept on the next write into the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-{_HOST_TAG}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN/inf are written as null)."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Atomically write a file produced by ``save(tmp_path)`` (torch.save, safetensors, ...)."""
    return _atomic(path, save)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error that names the file when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LcnnError(f"{path} does not exist; build it first (e.g. `snakemake {path}`)") from None
    except json.JSONDecodeError as err:
        raise LcnnError(f"{path} is not valid JSON ({err}); delete it and rebuild it") from None


def json_arg(text: str, flag: str = "--config-json", section: str | None = None) -> dict[str, Any]:
    """A JSON object passed inline (how the Snakemake rules pass it: one quoted argument) or as a file path.

    With ``section``, a whole config is accepted too and its ``section`` is returned.
    """
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise LcnnError(f"{flag} is not valid JSON ({err}); pass a JSON object or a JSON file") from None
    else:
        obj = read_json(text)
    if not isinstance(obj, dict):
        raise LcnnError(f"{flag} must hold a JSON object, not {type(obj).__name__}")
    if section and isinstance(obj.get(section), dict):
        obj = obj[section]
    return obj


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Describe where a result was produced: packages, device, CPU, git commit and SLURM job."""
    import torch

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "accelerate", "safetensors", "numpy", "pandas", "onnxruntime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cuda = torch.cuda.is_available()
    env = {
        "python": platform.python_version(),
        "packages": versions,
        "lcnn_git_commit": _git_commit(),
        "lcnn_source": str(Path(__file__).resolve().parent),  # which checkout of lcnn the job ran
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver_version": nvidia_driver() if cuda else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job_partition": os.environ.get("SLURM_JOB_PARTITION"),
    }
    return env


def nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi reports it, or None where there is no nvidia-smi or it fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""A real uvicorn server process for tests: started on given folders, killed or stopped at will."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python main.py`` with SAM2_* settings; its output is read line by line so that tests
    wait for what it logs (never for a fixed time)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {"SAM2_HOST": "127.0.0.1", "SAM2_PORT": str(self.port),
                                 "SAM2_WARM_UP": "false", "PYTHONUNBUFFERED": "1"} | env
        self.log_path = log_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False  # the process closed its output: every line is in
        self.proc: subprocess.Popen | None = None

    command = ["main.py"]
    ready_lines = ("model ready", "Uvicorn running on")

    def start(self, ready_timeout: float = 300) -> Server:
        self.lines, self._eof = [], False
        self.proc = subprocess.Popen([sys.executable, *self.command], cwd=ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        for line in self.ready_lines:
            self.wait_for_log(line, ready_timeout)
        return self

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_log(self, text: str, timeout: float) -> str:
        def found():
            return next((ln for ln in self.lines if text in ln), None)

        with self._cond:
            ok = self._cond.wait_for(lambda: found() or self._eof, timeout)
            line = found()
        if not line:
            raise AssertionError(f"server never logged {text!r} (exit {self.proc.poll()}, ok="
                                 f"{ok}):\n" + "".join(self.lines[-40:]))
        return line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)


class RayServer(Server):
    """``python serve_ray.py``: a local Ray cluster of its own, its workers and Serve ingress."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 2, cpus: int = 2):
        super().__init__(env | {"SAM2_RAY_WORKERS": str(workers), "SAM2_RAY_CPUS_PER_WORKER": "1",
                                "SAM2_TORCH_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                         log_path)
        self.command = ["serve_ray.py", "--num-cpus", str(cpus)]

    ready_lines = ("serving on http",)

    def ray_run(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a Ray driver attached to this server's cluster (the address it
        logged; ``ray`` imported, connected to the namespace ``sam2``); its stdout."""
        address = self.wait_for_log("Ray cluster at ", 0).split("Ray cluster at ")[1].split()[0]
        script = (f"import ray\nray.init(address={address!r}, namespace='sam2', "
                  f"log_to_driver=False)\n")
        env = self.env
        if any("Token authentication is enabled" in line for line in self.lines):
            env = env | {"RAY_AUTH_MODE": "token"}  # the cluster's token is in ~/.ray
        done = subprocess.run([sys.executable, "-c", script + code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def stop(self) -> None:
        """SIGTERM (the cluster stops with its driver); SIGKILL to the group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's peak resident memory (VmHWM); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)

"""Helpers for the server tests: a server subprocess on a free port, metrics parsing."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# For OpenAI clients of the test servers: openai's default connect timeout (5 s) failed once
# on a loaded 2-core CI host (httpcore.ConnectTimeout with the server healthy), so a wider
# one; a hung request still fails, after two minutes.
CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m loraplex.server ARGS`` on a free loopback port; logs go to ``log_path``.

    With ``wait=False`` the constructor returns at once (start several, then
    ``wait_healthy()`` on each, to overlap their start-up).
    """

    def __init__(self, args: list[str], log_path: Path, wait: bool = True,
                 timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex.server", *args, "--port", str(self.port),
             "--device", "cpu", "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels kept verbatim)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


class InProcessServer:
    """Serve a FastAPI app with uvicorn in a thread of this process (for fault injection)."""

    def __init__(self, app, timeout_s: float = 30.0) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def openai_client_on(model_dir, adapters: dict[str, str], **engine_kwargs) -> Iterator:
    """An OpenAI client of an in-process server (served name "tiny") over a CPU
    ``LLMEngine.from_args(model_dir, adapters=adapters, **engine_kwargs)``."""
    import openai

    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    engine = LLMEngine.from_args(str(model_dir), adapters=adapters, device="cpu",
                                 **engine_kwargs)
    srv = InProcessServer(create_app(engine, ServerConfig("tiny", str(model_dir), adapters)))
    try:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                            timeout=CLIENT_TIMEOUT)
    finally:
        srv.stop()


class RawHTTP:
    """A bare HTTP/1.1 keep-alive connection: one socket, requests sent one after another.

    httpx silently opens a new connection when the server drops one; this does not, so a
    test can tell a dropped keep-alive connection (``ConnectionError``) from an answered
    request. Bodies with ``Content-Length`` and chunked bodies (event streams) are read.
    """

    def __init__(self, base_url: str, timeout_s: float = 60.0) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self._buf = b""

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        head = {"Host": "test", "Content-Length": str(len(body)),
                "Content-Type": "application/json", **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.read_response()

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        status_line, *header_lines = self._read_until(b"\r\n\r\n").decode("latin-1").split(
            "\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (h.partition(":") for h in header_lines if h)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n"), 16)
                body += self._read_exact(size)
                self._read_until(b"\r\n")
                if size == 0:
                    break
        else:
            body = self._read_exact(int(headers.get("content-length", "0")))
        return status, headers, body

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf += data

    def _read_until(self, sep: bytes) -> bytes:
        while sep not in self._buf:
            self._fill()
        out, self._buf = self._buf.split(sep, 1)
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        self.sock.close()

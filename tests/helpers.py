"""Small pieces several test files share: polling for a condition, and a threaded HTTP
server on loopback (the S3 fault proxy, the OpenAI-compatible chat server)."""
from __future__ import annotations

import contextlib
import threading
import time
from http.server import ThreadingHTTPServer


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """predicate()'s first truthy value within timeout seconds, else an AssertionError
    naming what was awaited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


class LoopbackServer:
    """handler served on 127.0.0.1 (a free port, or `port`) by a daemon thread, at
    `self.url` (+ path); as a context manager, shut down and closed on exit."""

    def __init__(self, handler, port: int = 0, path: str = ""):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def unloadable_copy(source, dest):
    """A copy of a model folder whose weights pass every check made while planning (a
    well-formed safetensors file, its header matching the file) and fail when a worker
    loads them: the final norm's weight has another shape (transformers refuses the
    mismatch). Returns dest."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, dest)
    path = Path(dest) / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(dest)


@contextlib.contextmanager
def moto_server(log=None):
    """moto's S3 server on loopback, in its own process (its Flask app must not live in the
    test process, where vLLM's kernel registry walks every loaded module and trips over
    Flask's context-bound globals); yields its URL. log: a file for its request lines."""
    import socket
    import subprocess
    import sys
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    url = f"http://127.0.0.1:{port}"

    def answers():
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("the moto S3 server did not start")
            return False
    try:
        wait_for(answers, 60, "the moto S3 server to start", poll=0.2)
        yield url
    finally:
        server.terminate()
        server.wait()

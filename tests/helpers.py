"""Small pieces several test files share: polling for a condition, and a threaded HTTP
server on loopback (the S3 fault proxy, the OpenAI-compatible chat server)."""
from __future__ import annotations

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

"""A model actor placed on a GPU waits, with a bound, until the GPU has its share free
(workers/gpu_memory.py): the executor ends an actor and starts the next on the same GPU in
one step, and the ended one's memory comes back only when its processes are gone. The
CUDA memory query is replaced by a stand-in GPU whose memory a released actor frees late."""
from __future__ import annotations

import threading
import time

import pytest

from workers.gpu_memory import GPUMemoryError, share_bytes, wait_for_free_memory

GB = 1e9


class StandInGPU:
    """torch.cuda.mem_get_info's answer for one 80 GB device, with one actor on it."""

    def __init__(self, held_gb: float):
        self.total, self.held, self.queries = 80 * GB, held_gb * GB, 0

    def query(self, device: int) -> tuple[int, int]:
        assert device == 0
        self.queries += 1
        return int(self.total - self.held), int(self.total)

    def release_after(self, seconds: float) -> threading.Thread:
        def release():
            time.sleep(seconds)
            self.held = 0.0
        thread = threading.Thread(target=release)
        thread.start()
        return thread


def test_the_next_actor_waits_for_the_released_ones_memory():
    gpu = StandInGPU(held_gb=60)        # the released actor, still exiting
    releasing = gpu.release_after(1.0)
    start = time.monotonic()
    wait_for_free_memory([0], 40 * GB, timeout_s=30, poll_s=0.05, query=gpu.query)
    waited = time.monotonic() - start
    releasing.join()
    assert 0.9 <= waited < 10 and gpu.queries > 2


def test_room_enough_does_not_wait():
    gpu = StandInGPU(held_gb=30)
    start = time.monotonic()
    wait_for_free_memory([0], 40 * GB, timeout_s=30, poll_s=0.05, query=gpu.query)
    assert time.monotonic() - start < 0.5 and gpu.queries == 1


def test_memory_that_never_comes_back_fails_in_one_line_with_the_numbers():
    gpu = StandInGPU(held_gb=60)
    with pytest.raises(GPUMemoryError) as error:
        wait_for_free_memory([0], 40 * GB, timeout_s=0.3, poll_s=0.05, query=gpu.query)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("GPU 0: 20.0 GB free of 80.0 GB after 0 s, this actor's share needs 40.0 GB")


def test_an_actors_share():
    """90% of its fraction of the GPU, the most vLLM asks for (utilisation 0.9 x share)."""
    assert share_bytes(0.25, int(80 * GB)) == pytest.approx(18 * GB)
    assert share_bytes(0.5, int(80 * GB)) == pytest.approx(36 * GB)
    assert share_bytes(2.0, int(80 * GB)) == pytest.approx(72 * GB)   # two GPUs: most of each

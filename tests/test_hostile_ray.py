"""The Ray engine under hostile luck: an embedding actor SIGKILLed mid-batch, on a real local Ray.

Whatever Ray does about the lost actor (restart it and retry the batch, or give up), featx
must either finish with the right table or stop with one FeatXError line; the store is never
left damaged, and the same command again gives exactly the local engine's table.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from featx.errors import FeatXError  # noqa: E402
from featx.extract import extract  # noqa: E402


def _embed_actor_pids() -> list[int]:
    """The processes of featx's embedding actors, by the title Ray gives them (this machine)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            # EmbedActor (GPU clusters) or DecodeEmbedActor (CPU: decode and embed in one actor),
            # idle ("ray::DecodeEmbedActor") or in a call ("ray::DecodeEmbedActor.embed")
            if title.startswith((b"ray::EmbedActor", b"ray::DecodeEmbedActor")):
                pids.append(int(p))
    return pids


def test_an_actor_killed_mid_batch_never_costs_a_wrong_table(lite0, image_folder, tmp_path):
    ref = extract(image_folder, lite0, store=tmp_path / "ref", device="cpu", write=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    killed: list[int] = []
    try:
        def progress(stage: str, done: int, total: int) -> None:
            if stage == "embed" and done and not killed:
                for pid in _embed_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        store = tmp_path / "s"
        try:
            first = extract(image_folder, lite0, store=store, device="cpu", write=False, engine="ray",
                            batch_size=1, shard_size=1, progress=progress)
        except FeatXError as e:  # Ray gave up on the batch: one featx error, nothing worse
            assert "\n" not in str(e).strip() or "Ray" in str(e)
            first = None
        assert killed, "no embedding actor was found to kill"
        if first is not None:  # Ray restarted the actor and retried the lost batch
            assert first.table.keys == ref.table.keys
            np.testing.assert_allclose(first.table.X, ref.table.X, rtol=1e-5, atol=1e-6)
        again = extract(image_folder, lite0, store=store, device="cpu", write=False, engine="ray")
    finally:
        ray.shutdown()
    assert again.table.keys == ref.table.keys and not again.stats.failures
    np.testing.assert_allclose(again.table.X, ref.table.X, rtol=1e-5, atol=1e-6)

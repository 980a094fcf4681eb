"""How extraction shares the CPU: on a CPU the readers run the model, one thread per call.

docs/performance.md (issue 14) measures why; these tests pin down which schedule runs
when, that it gives the same embeddings and failures, and that its session opens once.
"""

import threading

import numpy as np
import pytest

from featx.embed.images import load_image
from featx.embed.runtime import READER_TASK, Encoder, available_providers, usable_cpus
from featx.embed.scan import scan
from featx.embed.store import EmbeddingStore
from featx.engines.local import embed_files

from .helpers import make_image_folder


def files_of(root):
    return [str(root / it.path) for it in scan(root).items]


def test_readers_run_the_model_on_a_cpu(lite0, tmp_path):
    """As many readers as cores: each embeds its own images through a one-thread session;
    the encoder's own (all-cores) session never opens, and the embeddings are the same."""
    root = make_image_folder(tmp_path / "data", per_class=READER_TASK)  # two tasks and more
    files = files_of(root)
    enc = Encoder(lite0, device="cpu")
    store = EmbeddingStore(lite0, tmp_path / "s")
    keys, stats = embed_files(files, enc, store, batch_size=32, workers=usable_cpus())
    twin = enc.for_readers(usable_cpus())
    assert twin is not None and twin.threads == 1
    assert enc._session is None and twin._session is not None
    assert stats.embedded == len(files) and stats.seconds_model > 0
    direct = Encoder(lite0, device="cpu")(np.stack([load_image(f, lite0.preprocess) for f in files]))
    np.testing.assert_allclose(store.get(keys), direct, rtol=1e-5, atol=1e-5)


def test_a_bad_file_in_a_reader_task_fails_alone(lite0, tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3)
    bad = root / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = files_of(root)
    enc = Encoder(lite0, device="cpu")
    keys, stats = embed_files(files, enc, EmbeddingStore(lite0, tmp_path / "s"), workers=usable_cpus())
    assert enc.for_readers(usable_cpus()) is not None
    assert [f for f, _ in stats.failures] == [str(bad)]
    assert sum(k is not None for k in keys) == len(files) - 1 == stats.embedded


@pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 cores: one reader must be fewer than the cores")
def test_fewer_readers_than_cores_keep_the_model_on_its_own_threads(lite0, tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2)
    enc = Encoder(lite0, device="cpu")
    _, stats = embed_files(files_of(root), enc, EmbeddingStore(lite0, tmp_path / "s"), workers=1)
    assert enc.for_readers(1) is None
    assert enc._session is not None and stats.embedded == 4


def test_fixed_threads_or_a_gpu_keep_the_model_on_its_own_thread(lite0):
    assert Encoder(lite0, device="cpu", threads=2).for_readers(usable_cpus()) is None
    assert Encoder(lite0, device="cpu").for_readers(usable_cpus()) is not None
    if "CUDAExecutionProvider" in available_providers():
        assert Encoder(lite0, device="cuda").for_readers(usable_cpus()) is None


def test_twin_opens_one_session_for_all_readers(lite0):
    """Readers that call the twin at the same moment share one session, opened once."""
    enc = Encoder(lite0, device="cpu")
    twin = enc.for_readers(usable_cpus())
    assert enc.for_readers(usable_cpus()) is twin
    pixels = np.zeros((2, 224, 224, 3), np.uint8)
    sessions, start = [], threading.Barrier(8)

    def reader():
        start.wait()
        twin(pixels)
        sessions.append(twin.session)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sessions) == 8 and len({id(s) for s in sessions}) == 1


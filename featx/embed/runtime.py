"""ONNX Runtime sessions: loud device choice, tuned CPU options, batched embedding.

Threads. On a CPU the extraction engine runs the model on its reader threads
(``Encoder.for_readers``): each reader decodes a few images and embeds them in a
single-threaded call, so there are as many busy threads as cores and every thread
does whole images. Used on its own (predict on arrays, parity checks), an Encoder
spreads each call over all cores with ORT's intra-op threads.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from featx.backbones.artifact import Backbone
from featx.devices import choose_device
from featx.errors import DeviceError, FeatXError

log = logging.getLogger(__name__)

CPU_MODEL_BATCH = 4
# A single-threaded call is fastest image by image here (bench/extract.py: 12.9 ms at
# 1, 13.5 at 4, 14.2 at 32): its activations stay in one core's cache.
READER_MODEL_BATCH = 1
# Images a reader decodes, then embeds, per task when readers run the model.
READER_TASK = 8


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def usable_cpus() -> int:
    """CPUs this process may run on: logical CPUs (hyperthreads count) in its affinity mask."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def providers_for(device: str) -> list:
    """Execution providers for ``device``; an explicit cuda that cannot be had raises."""
    has_cuda = "CUDAExecutionProvider" in available_providers()
    if choose_device(device, has_cuda,
                     "ONNX Runtime has no CUDA provider here "
                     f"(available: {', '.join(available_providers())}). Install featx[gpu] "
                     "(onnxruntime-gpu, not onnxruntime) on a machine with an NVIDIA GPU, "
                     "or use --device cpu.") == "cuda":
        # heuristic search picks fast kernels without a slow first batch
        cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(onnx_path: str | os.PathLike | bytes, device: str = "auto",
                 threads: int | None = None, spin: bool = False):
    """An InferenceSession; returns (session, provider actually used).

    ``spin=False`` stops idle ORT threads from busy-waiting, which would steal
    the cores that decode images in parallel.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or usable_cpus()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    src = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=providers_for(device))
    except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NotImplemented,
            state.NoSuchFile) as e:  # a damaged or foreign graph: name the file, not ORT's stack
        where = "<in-memory model>" if isinstance(onnx_path, bytes) else str(onnx_path)
        raise FeatXError(f"{where}: ONNX Runtime cannot load this model ({str(e)[:300]})") from None
    used = sess.get_providers()[0]
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise DeviceError(f"--device cuda asked for, but ONNX Runtime ran on {used}")
    log.info("ONNX Runtime provider: %s", used)
    return sess, used


class Encoder:
    """Runs a backbone's ONNX graph on uint8 batches.

    The session opens on first use, so a run where everything is cached never
    pays for it; an explicit device that cannot be honoured fails here, at once.
    """

    def __init__(self, backbone: Backbone, device: str = "auto", threads: int | None = None,
                 spin: bool = False, model_batch: int | None = None, io_binding: bool | None = None,
                 model: bytes | None = None) -> None:
        self.backbone = backbone
        # the graph's bytes where backbone.onnx_path is not on this node (a Ray actor's shipped
        # copy): ORT loads them from memory, so no temporary file outlives a killed process
        self.model = model
        # IO binding (default: on CUDA only) copies the uint8 batch to the device once and
        # lets ORT write the embedding into a device buffer, instead of staging both per run
        self.io_binding = io_binding
        self.device = device
        self.threads = threads
        self.spin = spin
        # On CPU the graph runs on sub-batches of CPU_MODEL_BATCH: activations of
        # small batches stay in cache (bench/roofline.py: batch 32 reaches ~65% of
        # the sgemm rate, batch 1-4 far more). A GPU wants the whole batch.
        self.model_batch = model_batch
        self._planned = providers_for(device)
        self._session = None
        self._provider: str | None = None
        self._open = threading.Lock()  # readers may ask for the session at the same time
        self._twin: Encoder | None = None

    @property
    def session(self):
        if self._session is None:
            with self._open:
                if self._session is None:
                    self._session, self._provider = make_session(self.model or self.backbone.onnx_path, self.device,
                                                                 self.threads, self.spin)
        return self._session

    def for_readers(self, readers: int) -> Encoder | None:
        """A single-threaded twin for ``readers`` threads that each embed what they decoded.

        On a CPU, N readers beside an all-cores session are 2N threads on N cores: the
        model's parallel regions wait for their slowest thread, and a two-thread call
        costs ~1.3x the CPU of a one-thread call (docs/performance.md). N readers that
        decode and then embed in one-thread calls keep N cores busy on whole images.
        The twin's one session serves every reader (ONNX Runtime runs concurrent calls).
        None where the model is better on its own thread: on a GPU (it wants whole
        batches), with fewer readers than cores, or where the caller fixed the threads.
        """
        if (self.threads is not None or self.provider != "CPUExecutionProvider"
                or readers < usable_cpus()):
            return None
        with self._open:
            if self._twin is None:
                self._twin = Encoder(self.backbone, device=self.device, threads=1,
                                     model_batch=self.model_batch or READER_MODEL_BATCH,
                                     io_binding=self.io_binding, model=self.model)
        return self._twin

    @property
    def provider(self) -> str:
        """The provider in use (or, before the session opens, the one it will ask for first)."""
        if self._provider is not None:
            return self._provider
        first = self._planned[0]
        return first[0] if isinstance(first, tuple) else first

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim)."""
        s = self.backbone.preprocess.input_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise FeatXError(f"expected uint8 (N, {s}, {s}, 3) pixels, got {pixels.dtype} {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.backbone.dim), np.float32)
        sess = self.session
        name = sess.get_inputs()[0].name
        step = self.model_batch or (CPU_MODEL_BATCH if self.provider == "CPUExecutionProvider" else len(pixels))
        run = self._run_bound if self._binds() else (lambda x: sess.run(None, {name: x})[0])
        outs = [run(np.ascontiguousarray(pixels[i:i + step])) for i in range(0, len(pixels), step)]
        return np.asarray(np.concatenate(outs) if len(outs) > 1 else outs[0], dtype=np.float32)

    def _binds(self) -> bool:
        return self.io_binding if self.io_binding is not None else self.provider == "CUDAExecutionProvider"

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        sess = self.session
        dev = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        binding = sess.io_binding()
        binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, dev, 0))
        binding.bind_output(sess.get_outputs()[0].name, dev)
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

"""Ray engine for ``featx extract``: the same stages as the local engine, on a cluster.

The driver scans the folder and owns the store; the cluster does the work::

    paths --(tasks: hash_file)--> keys --driver: drop keys already stored-->
    todo  --(tasks: decode_batch)--> uint8 pixels --(actor pool: Encoder)--> embeddings
          --driver: ShardWriter, shard by shard--> table (same as featx.extract)

The stages are plain Ray tasks and actors fed by the driver, a few batches in flight per
actor, not Ray Data: a Ray Data actor pool imports Ray Data in every actor process (1.5 s
of CPU each) and plans an execution per stage, about 2 s of a 2,000-image run that the
local engine finishes in 7 (docs/scale.md).

Workers read files by path (``root`` must be the same path on every node) and
preprocess with featx's own ``decode_batch``, so pixels are those of the local
engine. Only the driver writes, so the store may sit on the driver's disk; the
embeddings stream back through the object store (5 KB per image at dim 1,280).

On one machine the driver hashes the files with the local engine's threads (Ray tasks
cost more than they save there). On CPU clusters the decode and the model run in the
same actor, the local engine's reader schedule: one actor per CPU, each decoding its batch
and embedding it with a one-thread ONNX Runtime session, one image per call
(``READER_MODEL_BATCH``), so the pixels never cross the object store and the embeddings
equal the local engine's bit for bit. GPU actors get their pixels from decode tasks instead, so the GPU never waits on
a decode. The driver's stat cache (``embed.statcache``) spares the cluster the hashing
of files unchanged since the last run, as in the local engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from featx import errors
from featx.backbones.artifact import Backbone, fingerprint_of
from featx.backbones.cards import Preprocess
from featx.devices import check_device_name, choose_device
from featx.embed.runtime import READER_MODEL_BATCH, Encoder
from featx.embed.scan import resolve_item_path
from featx.embed.statcache import Stat, StatCache, stat_of
from featx.embed.store import ShardWriter
from featx.engines.local import FileOutcomes, _hash_all, decode_batch, hash_file, to_embed
from featx.engines.result import EmbedStats, EngineRun, ExtractJob
from featx.errors import DeviceError, FeatXError, require
from featx.progress import ProgressFn

log = logging.getLogger(__name__)


class RayEngineError(FeatXError):
    """The Ray cluster could not run the extraction (not a bad image: those are reported)."""


# ---------------------------------------------------------------- worker side

def hash_rows(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Ray task: content key (or failure reason) of each file in the batch."""
    keys, reasons = [], []
    for rel in batch["path"]:
        key, why, _ = hash_file(resolve_item_path(root, str(rel)))
        keys.append(key or "")
        reasons.append(why or "")
    return {"i": batch["i"], "key": np.array(keys, dtype=object), "reason": np.array(reasons, dtype=object)}


def decode_rows(batch: dict[str, np.ndarray], root: str, pre: Preprocess,
                draft: bool) -> dict[str, np.ndarray]:
    """Ray task: featx's decode_batch on a batch of paths; failed rows keep zero pixels + a reason."""
    items = [(j, resolve_item_path(root, str(p)), str(k)) for j, (p, k) in enumerate(zip(batch["path"], batch["key"], strict=True))]
    ok, keys, pixels, failures = decode_batch(items, pre, draft)
    n, s = len(items), pre.input_size
    out_px = np.zeros((n, s, s, 3), np.uint8)
    out_key = np.array([str(k) for k in batch["key"]], dtype=object)
    reason = np.full(n, "", dtype=object)
    if ok:
        out_px[ok] = pixels
        out_key[ok] = keys  # the key of the bytes actually decoded
    for j, why in failures:
        reason[j] = why
    return {"i": batch["i"], "key": out_key, "reason": reason, "pixels": out_px}


class EmbedActor:
    """Ray actor: one ONNX Runtime session (a featx Encoder), opened at its first batch and
    used for every batch after.

    The shipped model comes with each call (a reference, not the bytes), not with the
    constructor: Ray warns on stderr at every start of a restartable actor whose
    constructor arguments live in the object store, and a restarted actor opens its
    session again from the call it retries.
    """

    default_threads: int | None = None  # ORT's choice: every core of the node
    model_batch: int | None = None

    def __init__(self, backbone: Backbone, device: str, threads: int | None) -> None:
        self.backbone, self.device, self.threads = backbone, device, threads
        self.encoder: Encoder | None = None

    def _open(self, model: list | None) -> Encoder:
        if self.encoder is not None:
            return self.encoder
        import ray

        backbone, data = self.backbone, None
        if self.device == "cuda" and not ray.get_gpu_ids():
            raise DeviceError(f"a featx actor on {os.uname().nodename} asked for a GPU but Ray gave it none")
        if model is not None:  # shipped through the object store: no shared filesystem needed
            data = ray.get(model[0])
            if fingerprint_of(data, backbone.preprocess) != backbone.fingerprint:
                raise FeatXError("the ONNX model shipped to the actor does not match the backbone fingerprint")
        elif not backbone.onnx_path.is_file():
            raise FeatXError(
                f"{backbone.onnx_path} is not reachable on node {os.uname().nodename}; put the "
                "backbone's export directory on storage every node mounts, or ship the model (ship_model=True)"
            )
        # Encoder raises DeviceError if an explicit cuda cannot be honoured: the run stops loudly
        # the shipped bytes load from memory: Ray kills actors without running finalizers, so a
        # temporary copy on disk would outlive every run (13 MB per actor)
        enc = Encoder(backbone, device=self.device, threads=self.threads or self.default_threads,
                      model_batch=self.model_batch, model=data)
        enc.session  # noqa: B018 -- open it now: a device problem stops the first batch
        self.encoder = enc
        return enc

    def embed(self, batch: dict[str, np.ndarray], model: list | None) -> dict[str, np.ndarray]:
        """Embed a batch of decoded pixels (rows with a reason stay zero)."""
        self._open(model)
        return self._embed(batch)

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.encoder is not None
        ok = np.array([not r for r in batch["reason"]], dtype=bool)
        emb = np.zeros((len(ok), self.encoder.backbone.dim), np.float32)
        t = time.perf_counter()
        if ok.any():
            emb[ok] = self.encoder(np.ascontiguousarray(batch["pixels"][ok]))
        seconds = time.perf_counter() - t
        return {"i": batch["i"], "key": batch["key"], "reason": batch["reason"], "embedding": emb,
                "provider": np.full(len(ok), self.encoder.provider, dtype=object),
                "seconds": np.full(len(ok), seconds / max(1, int(ok.sum())))}


class DecodeEmbedActor(EmbedActor):
    """Ray actor for CPU clusters: decodes its batch of paths, then embeds it (one-thread session).

    The local engine's reader schedule: pixels stay in the actor's process, and one image
    per call on one thread gives the local engine's numbers, at its best rate per core
    (``featx.embed.runtime.READER_MODEL_BATCH``).
    """

    default_threads = 1
    model_batch = READER_MODEL_BATCH

    def __init__(self, backbone: Backbone, device: str, threads: int | None, root: str,
                 draft: bool) -> None:
        self.root, self.draft = root, draft
        super().__init__(backbone, device, threads)

    def embed(self, batch: dict[str, np.ndarray], model: list | None) -> dict[str, np.ndarray]:
        """Decode a batch of paths, then embed it."""
        self._open(model)
        return self._embed(decode_rows(batch, self.root, self.backbone.preprocess, self.draft))


# ---------------------------------------------------------------- driver side

def connect(address: str | None, num_cpus: int | None):
    """Join ``address`` (or start a local Ray); returns (ray, whether we started it)."""
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local and "ray" not in sys.modules:
        # A new local Ray turns token authentication on when RAY_AUTH_MODE is unset, and
        # warns on stderr that it did. Asking for that same mode explicitly keeps the
        # security without the warning; Ray reads the variable once, at import, hence the
        # guards (an already imported Ray, or a cluster named by RAY_ADDRESS, is left alone)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if local:
        # Ray starts its workers at niceness 15 so that a cluster node's own services win;
        # a local Ray started for this extract is the user's foreground job, and at 15 any
        # normal-priority process on the machine halves its speed (1.9x the local engine's
        # wall time, measured; docs/scale.md). The raylet reads the variable when it starts.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray = require("ray", "ray")
    if ray.is_initialized():
        if address is not None:
            log.warning("Ray is already initialised in this process; using it, not %s", address)
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address is None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayEngineError(connect_advice(address, e)) from None
    return ray, True


def connect_advice(address: str | None, e: BaseException) -> str:
    """The error for a Ray that could not be joined or started, with the next step that fits."""
    if address is None:
        return f"cannot start a local Ray for this run: {e}"
    if address == "auto":  # Ray's own text goes on to ask for --address, which was given
        why = str(e).split(". Please", 1)[0]
        return (f"no running Ray cluster found from this machine (--address auto): {why}. Start one "
                "with `ray start --head` (then --address auto finds it), pass the head's HOST:PORT, "
                "or leave --address out and featx starts a local Ray for this run.")
    return (f"cannot connect to the Ray cluster at {address}: {e}. Check that its head is running "
            f"there (`ray status --address {address}`), or leave --address out and featx starts a "
            "local Ray for this run.")


def _device_plan(ray, device: str) -> str:
    """Resolve ``device`` against the cluster: ``auto`` means cuda when the cluster has GPUs."""
    check_device_name(device)
    gpus = ray.cluster_resources().get("GPU", 0)
    return choose_device(device, gpus >= 1,
                         "the Ray cluster has no GPU resources "
                         f"(resources: {ray.cluster_resources()}); use --device cpu or add GPU nodes")


def _unwrap(e: BaseException) -> BaseException:
    """The FeatXError behind a Ray task/actor failure, if there is one."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen or x is None:
            continue
        seen.add(id(x))
        if isinstance(x, FeatXError):
            return x
        stack.extend([getattr(x, "cause", None), x.__cause__, x.__context__])
    # a worker's exception that could not be unpickled reaches the driver as text only;
    # its traceback still names featx's error, so rebuild it from that
    m = re.search(r"featx\.errors\.(\w+): ([^\n]*)", str(e))
    cls = getattr(errors, m.group(1), None) if m else None
    if m and isinstance(cls, type) and issubclass(cls, FeatXError) and cls is not errors.ImageError:
        return cls(m.group(2).strip())
    return e


def _gather(ray, slots: list, submit_next, progress: ProgressFn, stage: str,
            total: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches as their tasks finish. ``submit_next(worker)`` gives that worker its next
    batch (a ref) or None; ``slots`` names a worker once per batch it may have in flight."""
    done = 0
    try:
        refs = {}
        for worker in slots:
            ref = submit_next(worker)
            if ref is not None:
                refs[ref] = worker
        while refs:
            (ready,), _ = ray.wait(list(refs), num_returns=1)
            worker = refs.pop(ready)
            b = ray.get(ready)
            nxt = submit_next(worker)
            if nxt is not None:
                refs[nxt] = worker
            done += len(b["i"])
            yield b
            progress(stage, done, total)
    except FeatXError:
        raise
    except Exception as e:
        raise _translate(e, stage) from None


def _translate(e: BaseException, stage: str) -> BaseException:
    cause = _unwrap(e)
    if isinstance(cause, FeatXError):
        return cause
    return RayEngineError(f"the Ray {stage} stage failed: {type(e).__name__}: {e}")


@dataclasses.dataclass
class RayEngine:
    """The stages of the local engine on a Ray cluster; same store, same table, same report.

    ``address``: a running cluster ("auto", "HOST:PORT", "ray://..."); None joins the Ray
    already initialised in this process or starts a local one (and stops it after), with
    the job's ``workers`` as its CPU count. The job's root must be readable at the same
    path on every node. ``actors``: size of the ONNX actor pool (default: one per GPU, or
    one per CPU on CPU clusters, each decoding and embedding its own batches);
    ``threads``: ORT threads per CPU actor (default 1). ``ship_model`` sends the
    ONNX bytes through the object store so nodes need not see the export directory.
    ``hash_on_driver``: hash the files the stat cache does not know in the driver's
    threads (default: when the cluster is one node) rather than in Ray tasks.
    Files that cannot be read are reported, not fatal.
    """

    address: str | None = None
    actors: int | None = None
    threads: int | None = None
    ship_model: bool = True
    hash_on_driver: bool | None = None
    name: str = "ray"

    def run(self, job: ExtractJob) -> EngineRun:
        """Embed ``job``'s files on the cluster into its store (the driver writes every shard)."""
        ray, started = connect(self.address, job.workers)
        try:
            dev = _device_plan(ray, job.device)
            keys, stats, providers = _run(ray, job, dev, self)
        finally:
            if started:
                ray.shutdown()
        provider = (",".join(sorted(providers))
                    or ("CUDAExecutionProvider" if dev == "cuda" else "CPUExecutionProvider"))
        return EngineRun(keys, stats, provider)


def _session_memory(bb: Backbone, one_thread: bool = False) -> int:
    """Bytes to reserve per actor: a worker process with ORT's arenas (Ray measured ~0.9 GiB
    for EfficientNet-Lite0 at batch 32; a one-thread session embedding one image at a time
    needs far less) plus the weights a few times over."""
    return 4 * bb.onnx_path.stat().st_size + (2**28 if one_thread else 2**30)


def _run(ray, job: ExtractJob, dev: str,
         engine: RayEngine) -> tuple[list[str | None], EmbedStats, set[str]]:
    """Hash on the cluster, drop stored keys, embed the rest; returns keys per item (None = failed)."""
    items = job.found.items
    stats = EmbedStats(files=len(items))
    t = time.perf_counter()
    cache = StatCache(job.store.root, job.root)
    out, stats_of = _hash_stage(job, cache, engine)
    stats.seconds_hash = time.perf_counter() - t

    have = job.store.stored(k for k in out.keys if k is not None)
    todo = to_embed(out.keys, have)
    stats.cached = sum(k is not None for k in out.keys) - len(todo)
    job.progress("embed", 0, len(todo))

    providers: set[str] = set()
    t1 = time.perf_counter()
    if todo:
        # the writer flushes when the block ends, even by Ctrl-C: keep what is embedded
        with ShardWriter(job.store, job.shard_size) as writer, _EmbedPool(ray, job, dev, engine) as pool:
            _collect(pool.run(todo, out.keys), out, writer, stats, providers)
    stats.seconds_embed = time.perf_counter() - t1
    out.drop_failed_copies()
    stats.failures = out.failure_list([it.path for it in items])
    cache.save({f: (st, k) for f, st, k in zip(_paths(job), stats_of, out.keys, strict=True)
                if k is not None and st is not None})
    return out.keys, stats, providers


def _paths(job: ExtractJob) -> list[str]:
    return [resolve_item_path(job.root, it.path) for it in job.found.items]


def _hash_stage(job: ExtractJob, cache: StatCache,
                engine: RayEngine) -> tuple[FileOutcomes, list[Stat | None]]:
    """Content key (or failure reason) of every file: from the driver's stat cache where the
    file is unchanged, else hashed by Ray tasks. Returns the keys and the stat each file had."""
    import ray

    items = job.found.items
    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    if engine.hash_on_driver if engine.hash_on_driver is not None else one_node:
        # one machine: the driver's threads hash as fast as Ray tasks would, without their
        # worker processes' start-up (with Ray Data, a third of a 2,000-image run's time)
        workers = job.workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featx-hash") as pool:
            return _hash_all(_paths(job), pool, workers, cache, job.progress)
    out = FileOutcomes([None] * len(items))
    # the stat is taken here, before any worker reads the file: a file changed in between
    # is recorded with its old stat, so the next run hashes it again (as the local engine)
    paths = _paths(job)
    stats_of = [stat_of(p) for p in paths]
    rows = []
    for i, (p, st) in enumerate(zip(paths, stats_of, strict=True)):
        key = cache.lookup(p, st)
        if key is None:
            rows.append({"i": i, "path": items[i].path})
        else:
            out.keys[i] = key
    job.progress("hash", len(items) - len(rows), len(items))
    if not rows:
        return out, stats_of
    task = ray.remote(num_cpus=1)(hash_rows)
    root, size = str(job.root.resolve()), max(job.batch_size, 64)
    chunks = (_columns(rows[j:j + size]) for j in range(0, len(rows), size))

    def submit_next(_: None):
        c = next(chunks, None)
        return None if c is None else task.remote(c, root)

    done = len(items) - len(rows)
    # a few chunks per CPU in flight: the cluster stays busy, the driver holds few refs
    for b in _gather(ray, [None] * (4 * _cpus(ray)), submit_next,
                     lambda stage, n, total: job.progress(stage, done + n, len(items)), "hash", len(rows)):
        for i, k, why in zip(b["i"], b["key"], b["reason"], strict=True):
            if why:
                out.failures[int(i)] = str(why)
            else:
                out.keys[int(i)] = str(k)
    return out, stats_of


def _cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=np.int64 if k == "i" else object) for k in rows[0]}


class _EmbedPool:
    """A pool of featx actors for one run, fed batch by batch from the driver.

    CPU clusters: one ``DecodeEmbedActor`` per CPU (the local engine's readers), two
    batches in flight each so an actor never waits for the driver. GPU clusters: one
    ``EmbedActor`` per GPU, its batches decoded by Ray tasks on the CPUs, with as many in
    flight per actor as keeps every CPU decoding.
    """

    def __init__(self, ray, job: ExtractJob, dev: str, engine: RayEngine) -> None:
        self.ray, self.job, self.gpus = ray, job, dev == "cuda"
        bb = job.backbone
        self.model = [ray.put(bb.onnx_path.read_bytes())] if engine.ship_model else None
        self.root = str(job.root.resolve())
        common = {"num_cpus": 1, "max_restarts": 1, "max_task_retries": 1}
        if self.gpus:
            self.actor_class = ray.remote(num_gpus=1, memory=_session_memory(bb), **common)(EmbedActor)
            self.size = engine.actors or int(ray.cluster_resources().get("GPU", 1))
            self.args: tuple = (bb, dev, engine.threads)
            self.in_flight = max(2, -(-_cpus(ray) // self.size))
            self.decode = ray.remote(num_cpus=1)(decode_rows)
        else:
            self.actor_class = ray.remote(memory=_session_memory(bb, one_thread=True), **common)(DecodeEmbedActor)
            self.size = engine.actors or _cpus(ray)
            self.args = (bb, dev, engine.threads, self.root, job.draft)
            self.in_flight = 2
        self.actors: list = []

    def run(self, todo: list[int], keys: list[str | None]) -> Iterator[dict[str, np.ndarray]]:
        """Embedded batches of the items ``todo`` (with their content ``keys``), in the order they finish."""
        items, bs = self.job.found.items, self.job.batch_size
        # made as they are sent: a driver holds a few batches, not the whole folder twice
        batches = (_columns([{"i": i, "path": items[i].path, "key": keys[i]} for i in todo[j:j + bs]])
                   for j in range(0, len(todo), bs))
        n_batches = -(-len(todo) // bs)
        # no more actors than batches: an actor with nothing to do still costs its start-up
        self.actors = [self.actor_class.remote(*self.args) for _ in range(min(self.size, n_batches))]

        def submit_next(a: int):
            b = next(batches, None)
            if b is None:
                return None
            if self.gpus:
                b = self.decode.remote(b, self.root, self.job.backbone.preprocess, self.job.draft)
            return self.actors[a].embed.remote(b, self.model)

        slots = [a for _ in range(self.in_flight) for a in range(len(self.actors))]
        yield from _gather(self.ray, slots, submit_next, self.job.progress, "embed", len(todo))

    def __enter__(self) -> _EmbedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        # free the actors (and their GPUs) now, on success, failure or Ctrl-C alike
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []


def _collect(batches: Iterator[dict[str, np.ndarray]], out: FileOutcomes, writer: ShardWriter,
             stats: EmbedStats, providers: set[str]) -> None:
    """Record each embedded batch: failures per file, embeddings into the shard writer."""
    for b in batches:
        ok = np.array([not r for r in b["reason"]], dtype=bool)
        for i, why in zip(b["i"][~ok], b["reason"][~ok], strict=True):
            out.fail(int(i), str(why))
        if ok.any():
            idx = [int(i) for i in b["i"][ok]]
            keys = [str(k) for k in b["key"][ok]]  # the keys of the bytes actually decoded
            stats.embedded += out.store(writer, idx, keys, np.asarray(b["embedding"][ok], np.float32))
            stats.seconds_model += float(b["seconds"][ok].sum())
            providers.update(str(p) for p in b["provider"][ok])

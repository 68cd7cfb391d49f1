"""Entry point of ``build``: cluster set-up, synthetic capture on demand, the summary."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from ..config import PipelineConfig
from ..manifest import ManifestEntry
from .build import SourceSpec, SubjectOutcome, run_build_dask, run_subject_inline
from ..errors import InputValueError

log = logging.getLogger(__name__)


def _pin_process(cores: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):  # every thread, and through them the threads started later
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass


class PinWorkerCores(WorkerPlugin):
    """Dask worker plugin: with a thread cap of N, local worker i runs on cores [i N, (i + 1) N) (modulo the
    core count). The cap then also holds for threads that libraries start on their own (COLMAP's image
    reader and writer threads run beside its single extraction thread), which no setting reaches."""

    name = "facecanon-pin-cores"

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker) -> None:
        try:
            index = int(worker.name)
        except (TypeError, ValueError):
            return
        n = os.cpu_count() or 1
        _pin_process({(index * self.threads + j) % n for j in range(min(self.threads, n))})


def make_client(cluster: str, workers: int = 0, threads: int = 0, slurm=None):
    """A Dask client and whether GPU workers exist: ``local`` (a LocalCluster of single-threaded worker
    processes, one per core; the stages use their own threads), ``tcp://host:port`` (an existing
    scheduler) or ``slurm`` (CPU and GPU jobs from the pipeline's ``[slurm]`` table)."""
    from distributed import Client, LocalCluster

    from ..devices import cuda_device_count

    if cluster == "local":
        gpus = cuda_device_count()
        from ..threads import thread_env

        env = thread_env(threads) or None  # read by the libraries as the workers import them
        lc = LocalCluster(n_workers=workers or max(1, os.cpu_count() or 1), threads_per_worker=1, processes=True,
                          resources={"GPU": gpus} if gpus else None, dashboard_address=":0", silence_logs=logging.ERROR,
                          env=env)
        client = Client(lc)
        if threads and hasattr(os, "sched_setaffinity"):
            client.register_plugin(PinWorkerCores(threads))
        return client, gpus > 0
    if cluster.startswith("tcp://"):
        client = Client(cluster)
        info = client.scheduler_info()
        gpu = any(w.get("resources", {}).get("GPU") for w in info.get("workers", {}).values())
        return client, gpu
    if cluster == "slurm":
        from .slurm import cluster_job_scripts, slurm_cluster

        sc = slurm_cluster(slurm)
        for kind, script in cluster_job_scripts(sc, slurm).items():  # exactly what was submitted
            log.info("SLURM %s job script (submitted):\n%s", kind, script)
        log.info("SLURM: %d CPU job(s) and %d GPU job(s) queued; tasks start as workers join", slurm.cpu_jobs,
                 slurm.gpu_jobs)
        client = Client(sc)
        if slurm.wait_for_workers:
            log.info("SLURM: waiting for %d worker(s) to join", slurm.wait_for_workers)
            try:
                client.wait_for_workers(slurm.wait_for_workers, timeout=slurm.wait_timeout_s)
            except TimeoutError:
                joined = len(client.scheduler_info().get("workers", {}))
                client.close()
                sc.close()
                raise InputValueError(f"SLURM: {joined} of slurm.wait_for_workers = {slurm.wait_for_workers} worker(s) "
                                      f"joined within {slurm.wait_timeout_s:g} s; see the jobs' logs in "
                                      f"{slurm.log_directory} and `squeue`") from None
        return client, slurm.gpu_jobs > 0
    raise InputValueError(f"--cluster must be 'local', 'slurm' or tcp://host:port, got {cluster!r}")


def ensure_synthetic_capture(cfg: PipelineConfig, root: str, subjects: list[str]) -> str:
    """The embedded default: render exactly the manifest's synthetic subjects that ``root`` lacks.

    A subject counts as present when its folder ``root/{pid}`` exists; a present subject is never
    re-rendered, replaced or deleted (a malformed one then fails alone in the build, its reason naming
    the file). Missing ids must be synthetic (900+); each is rendered from its own seeded stream
    (``synth.subject_rng``), so the result does not depend on which other subjects are rendered with
    it. Returns the ground-truth folder that ``synth`` writes beside the capture root.
    """
    from ..synthetic.synth import FIRST_SYNTHETIC_ID, synthesize

    root_dir = Path(root)
    gt = str(root_dir.parent / "ground_truth")
    present = [s for s in subjects if (root_dir / s).is_dir()]
    missing = [s for s in subjects if s not in present]
    not_synthetic = [s for s in missing if int(s) < FIRST_SYNTHETIC_ID]
    if not_synthetic:
        raise InputValueError(f"{root_dir}: subjects {', '.join(not_synthetic)} are missing and are not synthetic ids "
                         f"({FIRST_SYNTHETIC_ID}+), so they cannot be rendered")
    if missing:
        log.info("rendering %d missing synthetic subject(s) %s into %s", len(missing), ", ".join(missing),
                 root_dir.parent)
        synthesize(cfg, out=root_dir.parent, verify=False, subject_ids=missing)
    return gt


def build(entries: list[ManifestEntry], cfg: PipelineConfig, spec: SourceSpec, work: str, store: str,
          cluster: str = "local", subject: str | None = None, force=(), progress=None,
          workers: int = 0, keep_work: str = "all") -> list[SubjectOutcome]:
    """Run the chain for the manifest's subjects (or one ``subject`` in-process) and index the store;
    each completed subject's work folder then follows ``keep_work`` (none | light | all)."""
    from ..store import build_index

    subjects = [e.subject for e in entries]
    if subject is not None:
        if subject not in subjects:
            raise InputValueError(f"subject {subject} is not in the manifest")
        outcomes = [run_subject_inline(spec, subject, _entry_config(cfg, entries, subject), work, store, force,
                                       keep_work)]
    else:
        client, gpu = make_client(cluster, workers, cfg.threads, cfg.slurm)
        try:
            if client.dashboard_link:
                log.info("Dask dashboard: %s", client.dashboard_link)
            outcomes = []
            plain = [e.subject for e in entries if not (e.sequences or e.timestamps)]
            if plain:
                outcomes += run_build_dask(client, spec, plain, cfg, work, store, force, gpu, progress, keep_work)
            for e in entries:  # subjects with a sequence filter or a timestamps option carry their own config
                if e.sequences or e.timestamps:
                    outcomes += run_build_dask(client, spec, [e.subject], _entry_config(cfg, entries, e.subject),
                                               work, store, force, gpu, progress, keep_work)
        finally:
            client.close()
            if cluster in ("local", "slurm") and client.cluster is not None:
                client.cluster.close()
    if any(o.ok for o in outcomes) or Path(store, "zarr.json").is_file():
        build_index(store)
    return outcomes


def _entry_config(cfg: PipelineConfig, entries: list[ManifestEntry], subject: str) -> PipelineConfig:
    import copy

    entry = next(e for e in entries if e.subject == subject)
    if not (entry.sequences or entry.timestamps):
        return cfg
    out = copy.deepcopy(cfg)
    if entry.sequences:
        out.select.include_sequences = list(entry.sequences)
    if entry.timestamps:
        out.select.timestamps = entry.timestamps
    return out

"""``build --cluster slurm``: a dask-jobqueue ``SLURMCluster`` from the pipeline's ``[slurm]`` table.

One scheduler (in the process that runs ``build``) and two kinds of jobs: CPU jobs for select,
reconstruct, render and write, and GPU jobs that request ``--gres=gpu:N`` and advertise the Dask
resource ``GPU=N``, so the track task (which asks for ``GPU``) runs only there and nothing else does
unless the CPU workers are busy. GPU jobs are extra entries of the cluster's worker spec with their own
job options (dask-jobqueue's SpecCluster supports heterogeneous specs); ``scale`` is therefore called
once, before they are added.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..config import SlurmConfig

log = logging.getLogger(__name__)


def _cpu_options(cfg: SlurmConfig) -> dict:
    return dict(queue=cfg.queue or None, account=cfg.account or None, walltime=cfg.walltime, cores=cfg.cores,
                memory=cfg.memory, processes=cfg.processes, job_extra_directives=list(cfg.job_extra_directives),
                job_script_prologue=list(cfg.prologue), interface=cfg.interface or None,
                log_directory=cfg.log_directory or None)


def _gpu_options(cfg: SlurmConfig, base: dict) -> dict:
    """Job options of a GPU job: the CPU jobs' options with the GPU partition, size and resource."""
    return {**base, "queue": cfg.gpu_queue or cfg.queue or None, "cores": cfg.gpu_cores, "memory": cfg.gpu_memory,
            "processes": 1, "job_extra_directives": [*cfg.job_extra_directives, f"--gres=gpu:{cfg.gpus_per_job}"],
            "worker_extra_args": ["--resources", f"GPU={cfg.gpus_per_job}"]}


def slurm_cluster(cfg: SlurmConfig, submit: bool = True):
    """The cluster; with ``submit`` its CPU and GPU jobs are queued (sbatch) right away."""
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(scheduler_options={"dashboard_address": ":0"}, **_cpu_options(cfg))
    if submit:
        cluster.scale(jobs=cfg.cpu_jobs)
        gpu = _gpu_options(cfg, cluster._job_kwargs)
        for i in range(cfg.gpu_jobs):
            cluster.worker_spec[f"gpu-{i}"] = {"cls": cluster.job_cls, "options": gpu}
        if cfg.gpu_jobs:
            cluster.sync(cluster._correct_state)
    return cluster


def cluster_job_scripts(cluster, cfg: SlurmConfig) -> dict[str, str]:
    """The sbatch scripts of ``cluster``'s CPU jobs and (when ``cfg`` has them) GPU jobs, with its
    scheduler address: exactly what it submits."""
    scripts = {"cpu": cluster.job_script()}
    if cfg.gpu_jobs:
        gpu_job = cluster.job_cls(scheduler=cluster.scheduler_address, name="gpu-0",
                                  **_gpu_options(cfg, cluster._job_kwargs))
        scripts["gpu"] = gpu_job.job_script()
    return scripts


def job_scripts(cfg: SlurmConfig) -> dict[str, str]:
    """The sbatch scripts of a CPU and a GPU job, without submitting anything (for review and tests)."""
    cluster = slurm_cluster(cfg, submit=False)
    try:
        return cluster_job_scripts(cluster, replace(cfg, gpu_jobs=max(cfg.gpu_jobs, 1)))
    finally:
        cluster.close()

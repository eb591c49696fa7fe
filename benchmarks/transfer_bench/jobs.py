"""One fine-tuning job (:class:`Job`, :func:`finetune`) and running many in worker processes
(:func:`run_jobs`)."""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grft_vision import trainable_parameters_report
from grft_vision.training import DistributedContext, TrainStep, evaluate, train_one_epoch
from grft_vision.tuner.anatomy import head_module_names

from .data import TargetData
from .first_order import measure
from .methods import METHODS, MethodContext, Prepared
from .model import build_vit, data_config, load_backbone, to_tensor
from .settings import Settings

__all__ = ["Job", "finetune", "run_jobs"]


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: ``method`` on ``target`` with ``seed``, at learning rate ``lr`` (and L2 lambda
    ``reg_lambda`` for the GRFT family).

    ``eval_epochs``: epochs (1-based) after which the test top-1 is also recorded, within the one run.
    ``short_schedule``: a run of this many epochs, cosine from the first epoch without warm-up (None: the
    settings' warm-up + cosine epochs). ``train=False``: the method's selection and its first-order share
    only (:mod:`.first_order`), no training and no test.
    """

    target: str
    method: str
    seed: int
    lr: float
    reg_lambda: float
    split: str = "test"  # "test": train on the training set, report test; "val": train[:80%] -> train[80%:]
    eval_epochs: tuple[int, ...] = ()
    short_schedule: int | None = None
    train: bool = True


def _pretrained(settings: Settings, state: dict[str, torch.Tensor], num_classes: int, seed: int) -> nn.Module:
    """The pre-trained model with a new head, initialised as every job of ``seed`` initialises it, without
    touching the global random state (a second, unwrapped copy for :func:`.first_order.measure`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_backbone(build_vit(settings, num_classes), state).to(settings.device)


def _epochs(job: Job, settings: Settings) -> tuple[int, int]:
    """(warm-up epochs, cosine epochs) of ``job``'s run."""
    return (0, job.short_schedule) if job.short_schedule else (settings.warmup_epochs, settings.epochs)


def finetune(job: Job, settings: Settings, state: dict[str, torch.Tensor], data: TargetData,
             lora_rank: int) -> dict[str, Any]:
    """Prepare a fresh copy of the pre-trained model with ``job.method``, train it, return its test top-1 with
    the trainable count, the losses, the timings (seconds), the method's diagnostics (``info``) and, for a
    static row / column choice, its first-order share (``first_order``; :func:`.first_order.measure`)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if job.split == "val":
        data = data.split_validation()
    torch.manual_seed(job.seed)  # the head's initialisation
    device = torch.device(settings.device)
    model = load_backbone(build_vit(settings, data.num_classes), state).to(device)
    base_total = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for n in head_module_names(model) for p in model.get_submodule(n).parameters())
    loader = DataLoader(TensorDataset(to_tensor(data.train_images), torch.from_numpy(data.train_labels)),
                        batch_size=settings.batch_size, shuffle=True, generator=torch.Generator().manual_seed(job.seed))
    total_steps = sum(_epochs(job, settings)) * len(loader)
    ctx = MethodContext(job.target, job.seed, data.num_classes, data.train_images, data.train_labels,
                        data_config(settings), settings.batch_size, job.reg_lambda, lora_rank, settings.num_subsets,
                        total_steps)
    prepared = METHODS[job.method].build(model, ctx)
    prepare_seconds = time.perf_counter() - start
    first_order = None if not METHODS[job.method].chooses else measure(
        prepared.model, _pretrained(settings, state, data.num_classes, job.seed), data.train_images,
        data.train_labels, prepared.info["train_bias"])
    record = {"target": job.target, "method": job.method, "seed": job.seed, "split": job.split, "lr": job.lr,
              "reg_lambda": job.reg_lambda if METHODS[job.method].family == "grft" else None,
              "first_order": first_order, "prepare_seconds": prepare_seconds,
              "first_order_seconds": time.perf_counter() - start - prepare_seconds}
    if not job.train:
        return {**record, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
                "info": prepared.info}
    optimizer = torch.optim.Adam(prepared.params, lr=job.lr)
    context = DistributedContext(device=device)
    test_loader = DataLoader(TensorDataset(to_tensor(data.test_images), torch.from_numpy(data.test_labels)),
                             batch_size=256)
    top1_by_epoch: dict[str, float] = {}
    eval_seconds = 0.0

    def after_epoch(epoch: int) -> None:
        nonlocal eval_seconds
        if epoch in job.eval_epochs:
            eval_start = time.perf_counter()
            top1_by_epoch[str(epoch)] = _test_top1(prepared.model, test_loader, context)
            eval_seconds += time.perf_counter() - eval_start

    train_start = time.perf_counter()
    losses, steps, epochs = _train(prepared, optimizer, loader, settings, job, context, after_epoch)
    train_seconds = time.perf_counter() - train_start - eval_seconds  # training alone, without the evaluations
    # counted after training: a schedule swaps the optimizer's tensors (incremental ones grow to the budget)
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    if prepared.schedule is not None:
        prepared.info.update(report_trainable=trainable_parameters_report(prepared.model).trainable,
                             schedule_events=prepared.schedule.events, entry_updates=prepared.schedule.updates,
                             mean_trainable_per_step=prepared.schedule.updates / max(steps, 1))
    top1 = _test_top1(prepared.model, test_loader, context)
    if epochs in job.eval_epochs:
        top1_by_epoch[str(epochs)] = top1
    return {
        **record, "top1": top1, "top1_by_epoch": top1_by_epoch, "short_schedule": job.short_schedule,
        "train_seconds": train_seconds, "trainable": trainable, "head_params": head_params,
        "total": base_total, "trainable_percent": 100.0 * trainable / base_total,
        "final_train_loss": losses.get("task_loss"), "final_reg_loss": losses.get("reg_loss"), "epochs": epochs,
        "train_images": len(data.train_labels), "test_images": len(data.test_labels),
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, "info": prepared.info,
    }


def _test_top1(model: nn.Module, loader: DataLoader, context: DistributedContext) -> float:
    predictions, targets = evaluate(model, loader, context=context, progress=False)
    return float((predictions == targets).float().mean())


def _train(prepared: Prepared, optimizer: torch.optim.Optimizer, loader: DataLoader, settings: Settings, job: Job,
           context: DistributedContext,
           after_epoch: Callable[[int], None] | None = None) -> tuple[dict[str, float], int, int]:
    """Train with cross-entropy (+ the method's regulariser and schedule), timm's cosine schedule after a linear
    warm-up (both from ``job.lr`` * 1e-3; :func:`_epochs`), calling ``after_epoch(epoch)`` (1-based) after every
    epoch but the last; returns the last epoch's mean losses, the optimizer steps and the epochs."""
    from timm.scheduler import create_scheduler_v2

    warmup, cosine = _epochs(job, settings)
    scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cosine, warmup_epochs=warmup,
                                            warmup_lr=job.lr * 1e-3, min_lr=job.lr * 1e-3, warmup_prefix=True)
    before_step = None
    if prepared.schedule is not None:
        def before_step(global_step: int) -> None:
            prepared.schedule.before_step(global_step, optimizer)

    train_step = TrainStep(prepared.model, optimizer, nn.CrossEntropyLoss(), regularizer=prepared.regularizer,
                           before_step=before_step, context=context)
    losses = {}
    for epoch in range(epochs):
        losses = train_one_epoch(train_step, loader, epoch, progress=False)
        scheduler.step(epoch + 1)
        if after_epoch is not None and epoch + 1 < epochs:
            after_epoch(epoch + 1)
    return losses, train_step.global_step, epochs


# ------------------------------------------------------------------------------------ worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(settings: dict, state: dict[str, torch.Tensor], targets: dict[str, TargetData],
                 lora_rank: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(settings=Settings.from_dict(settings), state=state, targets=targets, lora_rank=lora_rank)


def _run_job(job: Job) -> dict[str, Any]:
    return finetune(job, _WORKER["settings"], _WORKER["state"], _WORKER["targets"][job.target], _WORKER["lora_rank"])


def _outcome(result: dict[str, Any]) -> str:
    """A finished job in a few words: top-1 and trainable count, or the first-order share alone."""
    if "top1" in result:
        return f"top-1 {result['top1']:.3f}, {result['trainable']:,} trainable"
    first_order = result["first_order"]
    return "no row / column choice" if first_order is None else f"first-order share {first_order['share']:.3f}"


def run_jobs(jobs: list[Job], settings: Settings, state: dict[str, torch.Tensor], targets: dict[str, TargetData],
             lora_rank: int, workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every job, the costliest first, in ``workers`` spawned processes of one thread each (``workers`` <= 1:
    in this process, on one thread); one line per finished job to ``log``. Results in the order they finish."""
    jobs = sorted(jobs, key=lambda j: -METHODS[j.method].cost)  # longest first: better packing
    results = []
    start = time.perf_counter()

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        log(f"[{len(results):>3}/{len(jobs)}] {result['target']:<11} {result['method']:<22} seed {result['seed']} "
            f"({result['split']}): {_outcome(result)}, {result['seconds']:.1f} s "
            f"(elapsed {time.perf_counter() - start:.0f} s)")

    if workers <= 1:  # in this process, one thread (the model is small: more threads mostly add overhead)
        threads = torch.get_num_threads()
        _init_worker(settings.to_dict(), state, targets, lora_rank, 1)
        try:
            for job in jobs:
                done(_run_job(job))
        finally:
            torch.set_num_threads(threads)
        return results
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(settings.to_dict(), state, targets, lora_rank, 1)) as pool:
        for result in pool.imap_unordered(_run_job, jobs):
            done(result)
    return results

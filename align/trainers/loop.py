"""Plumbing shared by every stage: accelerate set-up, optimizer and schedule, the step loop with logging,
evaluation and checkpoints (written by `checkpoints.py`, recorded by `metrics.py`).

A stage supplies a `step_fn(step) -> metrics` that does its forward/backward work for one optimizer step, an
optional `eval_fn(step) -> metrics`, and an optional `extra_state` object with `state_dict()`/`load_state_dict()`
(e.g. a KL controller) that is checkpointed too. Inside a step every stage uses the same three pieces:
`run.accumulate(micro_batches)` (the gradient-accumulation loop: no gradient sync until the last micro-batch,
autocast), `run.backward(loss)` and `run.optimizer_step()` (sum gradients over processes where accelerate does
not, clip, step, zero, advance the schedule).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import AlignError, to_dict
from ..data import chunks_within_budget, global_batch_indices, process_chunks, split_micro_batches
from ..export import check_hub
from ..models import resolve_dtype
from .checkpoints import clear_previous_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .metrics import MetricsLogger, check_finite, mean_rows, resolve_trackers, tracker_objects


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


HEAP_MMAP_THRESHOLD = 4 << 20
HEAP_MIN_WIDTH = 512  # hidden size from which the fixed threshold is set without being asked


def model_width(module: nn.Module) -> int:
    """The largest hidden size of the Hugging Face models inside `module` (0 when none says)."""
    sizes = [getattr(getattr(m, "config", None), "hidden_size", 0) for m in module.modules()]
    return max([s for s in sizes if isinstance(s, int)] + [0])


def keep_heap_compact(width: int) -> int:
    """On glibc, serve every allocation of at least 4 MiB by mmap, so it goes back to the system when freed, for
    models of hidden size >= 512 (`width`); returns the threshold set (0: nothing done).

    glibc's own threshold is dynamic: it starts at 128 KiB and rises to the size of each mmapped block that is
    freed (up to 32 MiB), so after the first step's activations are freed, the next steps' tensors of a few MB
    come from the heap, where a freed block below a live one is never returned: RSS then keeps the high-water mark
    of every allocation pattern of the run (the LoRA PPO step of bench_real at the SmolLM2 shape, hidden 576:
    3.8 GiB, 3.3 with this, the same time). The price is fresh pages (a page fault each) for every such tensor:
    small next to the matrix products that make a tensor of a wide model, not for narrow ones (hidden 128: SFT
    and PPO steps 1.2-1.3x slower, hence the width). Blocks under 4 MiB stay on the heap (a 1 MiB threshold gave
    2.3 GiB at 1.4x the training time at the SmolLM2 shape). ALIGN_MMAP_THRESHOLD=N sets N bytes at any width
    (0: glibc's default); a MALLOC_MMAP_THRESHOLD_ in the environment (glibc read it at start) is left alone."""
    import ctypes
    import platform

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux") \
            or platform.libc_ver()[0] != "glibc":
        return 0
    raw = os.environ.get("ALIGN_MMAP_THRESHOLD", "").strip()
    try:
        threshold = int(raw) if raw else (HEAP_MMAP_THRESHOLD if width >= HEAP_MIN_WIDTH else 0)
    except ValueError:
        raise AlignError(f"ALIGN_MMAP_THRESHOLD={raw!r}: expected a number of bytes (0: glibc's default)") from None
    if threshold <= 0:
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover
        return 0
    m_mmap_threshold = -3  # malloc.h
    return threshold if libc.mallopt(m_mmap_threshold, threshold) == 1 else 0


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step s (0-based): linear warmup over `warmup`
    steps, then constant, linear decay to 0 or cosine decay to 0 at `total`."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise AlignError(f"lr_scheduler_type '{kind}' is not one of constant, linear, cosine")

    return f


def make_optimizer(params: list[tuple[str, nn.Parameter]], cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (fused); no weight decay on biases and normalisation weights (1-D tensors)."""
    decay = [p for n, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in params if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise AlignError("the model has no trainable parameters")
    # the fused kernel (CPU and CUDA): one pass over each parameter; on CPU 8x faster than foreach at 135M params
    return torch.optim.AdamW(groups, lr=lr if lr is not None else cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True)


def fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP launch (``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP) on CPU processes
    (gloo): accelerate turns FSDP on for accelerator devices only and would silently run plain data parallel.
    torch's FSDP2 (``fully_shard``) runs on CPU, so the run is switched to it here; FSDP1 is refused."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if (accelerator.distributed_type != DistributedType.MULTI_CPU
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise AlignError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 has no CPU "
                         "support); see recipes/accelerate/fsdp_cpu.yaml")
    from accelerate.state import PartialState

    # both shared states: AcceleratorState copies PartialState's whenever it is constructed again
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _reshards_after_forward(unit: nn.Module) -> bool:
    """Whether an FSDP2 unit frees its gathered weights after each forward (restored after `Run.whole`)."""
    groups = getattr(unit._get_fsdp_state(), "_fsdp_param_groups", None)
    return any(g.post_forward_mesh_info is not None for g in groups) if groups else True


class Run:
    """One training run: the accelerator, the trained module, its optimizer and schedule, logging and
    checkpoints. Stages build their models, then call `prepare`, then `train`."""

    def __init__(self, cfg, stage: str):
        from accelerate import Accelerator

        self.cfg = cfg
        self.stage = stage
        if getattr(cfg, "num_threads", 0) > 0:
            torch.set_num_threads(cfg.num_threads)
        self.weights_dtype, mixed = resolve_dtype(cfg.dtype)
        # report_to and push_to_hub are checked here, before any model is loaded or anything is written
        self.trackers = resolve_trackers(cfg.report_to)
        check_hub(cfg)
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                                       log_with=tracker_objects(self.trackers, cfg.output_dir) or None)
        fsdp_on_cpu(self.accelerator)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.model: nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.start_step = 0
        self.logger: MetricsLogger | None = None
        self.timers: dict[str, float] = {}
        self._whole: set[int] = set()  # FSDP2 units held whole by `whole`

    # -- set-up -----------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, max_steps: int, extra_state: Any = None, lr: float | None = None):
        """Wrap the trained module for the backend, build AdamW and the schedule, and resume if asked.
        Returns the prepared module (call it for forwards; `unwrap()` gives the original)."""
        cfg = self.cfg
        self.max_steps = max_steps
        keep_heap_compact(model_width(model))
        optimizer = make_optimizer(list(model.named_parameters()), cfg, lr)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * max_steps)
        # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once per
        # process), and checkpointed through register_for_checkpointing.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup,
                                                                                 max_steps))
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed reads its micro-batch size from a dataloader, which align does not prepare
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.is_main and self.world > 1:
            print(f"{self.stage}: {self.world} processes, {self.strategy}", file=sys.stderr, flush=True)
        if self.fsdp2:
            # FSDP2 sets up its units at the first forward of the root; the RL stages' first forward is generation
            # on a submodule (the policy), which would make a block think it is the root
            self.model._get_fsdp_state()._lazy_init()
        self.accelerator.register_for_checkpointing(self.scheduler)
        if extra_state is not None:
            self.accelerator.register_for_checkpointing(extra_state)
        ckpt = resolve_checkpoint(cfg)
        if ckpt is not None:
            self.start_step = load_checkpoint(self, ckpt)
        elif cfg.overwrite_output_dir:
            clear_previous_checkpoints(self)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.is_main:
            with open(os.path.join(cfg.output_dir, f"{self.stage}_config.json"), "w", encoding="utf-8") as fh:
                json.dump(to_dict(cfg), fh, indent=2)
        self.logger = MetricsLogger(cfg.output_dir, self.is_main, max_steps, self.start_step, self.accelerator,
                                    run_name=cfg.run_name, config={"stage": self.stage, **to_dict(cfg)},
                                    disable_tqdm=cfg.disable_tqdm, desc=self.stage)
        return self.model

    def unwrap(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # -- per step ---------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all processes: per-device batch x accumulation x processes."""
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps * self.world

    def micro_batches(self, step: int, num_examples: int) -> tuple[list[int], list[list[int]]]:
        """(the global batch of `step`: indices into the data, a function of the step alone; this process's
        gradient_accumulation_steps micro-batches of it)."""
        indices = global_batch_indices(step, num_examples, self.global_batch, self.cfg.seed)
        return indices, split_micro_batches(indices, self.world, self.rank, self.cfg.gradient_accumulation_steps)

    def shares(self, rows: torch.Tensor, accumulation: int, lengths: torch.Tensor | None = None,
               max_tokens: int = 0) -> list[tuple[torch.Tensor, float]]:
        """This process's `accumulation` micro-batches of one update over `rows` (global row indices of a batch
        every process holds, the same list on each), as (indices, weight) pairs.

        The rows are cut into processes × accumulation contiguous chunks and chunk c goes to process
        c % processes (as `micro_batches` does for data), so one process with N times the accumulation sums the
        gradients of the same rows as N processes. A chunk left empty (fewer rows than chunks) becomes row 0 with
        weight 0: every process runs the same number of forwards and backwards, which DDP's all-reduce and
        FSDP's all-gathers need. Multiply the micro-batch's loss by its weight.

        ``lengths`` (each row's sequence length, indexed by row, e.g. `Rollout.sequence_lengths`): with more
        than one chunk, the rows are first put in order of length (a stable sort), so that each micro-batch
        holds rows of similar length and is padded to less than the longest row of the update (a micro-batch
        is trimmed to its own longest row, `Rollout.subset`). The update sums the same rows' gradients.

        ``max_tokens`` > 0 (with ``lengths``): instead of processes × accumulation equal parts, the ordered rows
        are cut into as many micro-batches as keep each at most ``max_tokens`` padded tokens (rows × longest row;
        `data.chunks_within_budget`, their number a multiple of the processes), chunk c again to process
        c % processes: the peak activation memory follows the budget, not the rows' lengths."""
        dummy = torch.zeros(1, dtype=torch.long, device=rows.device)
        if lengths is not None and (max_tokens > 0 or self.world * accumulation > 1) and len(rows) > 1:
            order = torch.sort(lengths.to(rows.device)[rows], stable=True)
            rows = rows[order.indices]
            if max_tokens > 0:
                parts = chunks_within_budget(order.values.tolist(), max_tokens, self.world)
                return [(rows[torch.tensor(p, dtype=torch.long, device=rows.device)], 1.0) if p else (dummy, 0.0)
                        for c, p in enumerate(parts) if c % self.world == self.rank]
        return [(part, 1.0) if len(part) else (dummy, 0.0)
                for part in process_chunks(rows, self.world, self.rank, accumulation)]

    def accumulate(self, micro: Sequence[Any]) -> Iterator[Any]:
        """The gradient-accumulation loop: yields each micro-batch with the gradient all-reduce skipped until the
        last one and accelerate's autocast on, so the body only computes its loss and calls `backward`."""
        for k, item in enumerate(micro):
            with self.no_sync(last=k == len(micro) - 1), self.accelerator.autocast():
                yield item

    def step_over_examples(self, step: int, num_examples: int, model: nn.Module,
                           loss_fn: Callable[[list[int]], tuple[torch.Tensor, Any]], stats: Any
                           ) -> tuple[dict, Any, int]:
        """One optimizer step over the global batch of `step` in which every example weighs 1/global batch (the
        comparison stages): ``loss_fn(indices)`` gives a micro-batch's summed loss and its statistics (a
        ``comparisons.Sums``). Returns (the optimizer's metrics, the statistics summed over micro-batches and
        processes, the global batch size)."""
        indices, micro = self.micro_batches(step, num_examples)
        model.train()
        for idx in self.accumulate(micro):
            loss, s = loss_fn(idx)
            self.backward(loss * self.world / len(indices))  # DDP averages over processes
            stats = stats + s
        return self.optimizer_step(), stats.reduced(self.reduce_sum), len(indices)

    def no_sync(self, last: bool):
        """Context for one micro-batch's backward: skip the gradient all-reduce unless it is the last."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # the DeepSpeed engine steps inside backward when accelerate says gradients sync: only at the last
            self.accelerator.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        if last or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, schedule: bool = True, optimizer: torch.optim.Optimizer | None = None,
                       params: Sequence[nn.Parameter] | None = None, sum_grads: bool = False) -> dict[str, float]:
        """The one optimizer step of every stage: (sum the gradients of ``params`` over processes, for modules
        accelerate did not wrap), clip them to max_grad_norm, step, zero; advance the learning-rate schedule
        unless ``schedule`` is False (RL stages that make several updates per step advance it once per step).

        Default: the prepared optimizer over all the trained module's parameters. ``optimizer``: another
        optimizer (e.g. a reward model trained beside the policy) over ``params``. Returns the learning rate used
        (prepared optimizer) and grad_norm, the norm before clipping (when clipping is on)."""
        own = optimizer is None
        opt = self.optimizer if own else optimizer
        params = list(self.model.parameters() if params is None else params)
        out = {"learning_rate": self.scheduler.get_last_lr()[0]} if own else {}
        if sum_grads:
            self.sum_gradients(params)
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            # accelerate's clipping knows the prepared model's sharding and loss scaling; other optimizers' params
            # are plain tensors
            clip = self.accelerator.clip_grad_norm_ if own else torch.nn.utils.clip_grad_norm_
            out["grad_norm"] = float(clip(params, self.cfg.max_grad_norm))
        opt.step()
        if schedule and own:
            self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        return out

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over processes (`t` itself on one process): the one all-reduce that align
        makes outside accelerate's wrappers (TRPO's gradient, Fisher products, line search and critic fit, the
        iterative reward model's gradients, DPO's reference cache, metrics). Every process must call it, with a
        plain (unsharded) tensor of the same shape; it runs on torch.distributed's default group, which DDP,
        FSDP and DeepSpeed all use, so it is the same under every strategy."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t, reduction="sum")

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of `params` over processes in place (a missing gradient counts as zeros): for
        modules accelerate did not wrap, whose backward has no all-reduce hooks."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.all_sum(p.grad)

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over processes."""
        return self.all_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def sum_over_processes(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Each metric (a number or 0-dim tensor of this process) summed over processes, in one all-reduce. Every
        process must pass the same names."""
        names = sorted(metrics)
        return dict(zip(names, self.reduce_sum([float(metrics[k]) for k in names])))

    def mean_over_processes(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Each metric (a number or 0-dim tensor of this process) averaged over processes."""
        return {k: v / self.world for k, v in self.sum_over_processes(metrics).items()}

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` concatenated in process order (the tensor itself on one process). The first
        dimension may differ between processes; the others must not."""
        if self.world == 1:
            return t
        sizes = self.accelerator.gather(torch.tensor([t.shape[0]], device=self.device)).tolist()
        top = max(sizes)
        if top != t.shape[0]:
            t = torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))])
        flag = t.dtype == torch.bool  # gloo gathers no bool tensors
        out = self.accelerator.gather(t.long() if flag else t)
        out = torch.cat([out[k * top:k * top + n] for k, n in enumerate(sizes)])
        return out.bool() if flag else out

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's list concatenated in process order (picklable items)."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Inside, the trained module's weights are whole on every process (see `whole`): for work that runs
        many forwards outside training (generation: one forward per token) or calls submodules directly (the
        policy of a policy-and-critic module, evaluation). A no-op without FSDP2."""
        return self.whole(self.model)

    @contextlib.contextmanager
    def whole(self, module: nn.Module | None) -> Iterator[None]:
        """Under FSDP2, gather each sharded unit of `module` once on entry and keep it whole until the exit
        (instead of once per forward), then shard it again. Every process must enter (the gathers are
        collectives); inside, forwards make no collective calls, so processes may run different numbers of
        them. A no-op for a module that is not sharded."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule) and id(m) not in self._whole] \
            if module is not None else []
        if not units:  # not sharded, or held whole by an enclosing `whole`
            yield
            return
        reshard = [_reshards_after_forward(m) for m in units]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
            self._whole.add(id(m))
        try:
            yield
        finally:
            for m, again in zip(units, reshard):
                self._whole.discard(id(m))
                m.reshard()
                m.set_reshard_after_forward(again, recurse=False)

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """A model that is never trained (reference, reward model) placed per the strategy: under FSDP2 its
        blocks and the rest are sharded over the processes like the trained module (1/N of its weights on each
        between uses; use it inside `whole`), otherwise it is left as it is (replicated). Returns the module."""
        if not self.fsdp2:
            return module
        from torch.distributed.fsdp import fully_shard

        from ..models import no_split_modules

        blocks = set(no_split_modules(module))
        for m in list(module.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m)
        fully_shard(module)
        module._get_fsdp_state()._lazy_init()  # it is the root, though its users may call its submodules
        return module

    @property
    def strategy(self) -> str:
        """How the trained module is spread over processes: DDP, FSDP2, FSDP1, DeepSpeed ZeRO-k or single."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return "FSDP2" if self.fsdp2 else "FSDP1"
        if kind == DistributedType.DEEPSPEED:
            return f"DeepSpeed ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"
        return "DDP" if self.world > 1 else "single process"

    @property
    def fsdp2(self) -> bool:
        """Whether the trained module is sharded by FSDP2 (accelerate's fsdp_version 2)."""
        return self.accelerator.is_fsdp2

    @property
    def sharded(self) -> bool:
        """Whether the trained module's weights are sharded over processes (FSDP, DeepSpeed): gathering its state
        dict is then a collective."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @contextlib.contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t0

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self, step_fn: Callable[[int], dict[str, float]],
              eval_fn: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
        """Run optimizer steps start_step..max_steps-1; log, evaluate and checkpoint on schedule.
        Returns the last logged metrics.

        SIGTERM or SIGINT (reaching any process) stops the run after the current step: every process agrees on
        that step, a checkpoint is written and `signals.TrainingStopped` is raised (exit code 143 / 130), so
        the stage saves no final model. A signal during the last step lets the run complete."""
        from .signals import StopSignals, stop_run

        cfg = self.cfg
        last: dict[str, float] = {}
        window: list[dict[str, float]] = []
        t_start = time.perf_counter()
        with StopSignals(announce=self.is_main) as signals:
            for step in range(self.start_step, self.max_steps):
                self.timers = {}
                t0 = time.perf_counter()
                metrics = step_fn(step)
                metrics["step_time"] = time.perf_counter() - t0
                for k, v in self.timers.items():
                    metrics[f"time_{k}"] = v
                check_finite(step + 1, metrics)
                window.append(metrics)
                done = step + 1
                self.logger.advance()
                if done % max(1, cfg.logging_steps) == 0 or done == self.max_steps:
                    row = mean_rows(window)
                    row["epoch_progress"] = done / self.max_steps
                    row["elapsed"] = time.perf_counter() - t_start
                    window = []
                    if eval_fn is not None and cfg.eval_steps and done % cfg.eval_steps == 0 \
                            and done != self.max_steps:
                        row.update(eval_fn(done))
                    if done == self.max_steps and eval_fn is not None:
                        row.update(eval_fn(done))
                    self.logger.log(done, row)
                    last = row
                saved = None
                if cfg.save_steps and done % cfg.save_steps == 0 and done != self.max_steps:
                    saved = save_checkpoint(self, done)
                signum = signals.agreed(self)
                if signum and done != self.max_steps:
                    stop_run(self, signum, done, saved)
        if self.start_step >= self.max_steps and eval_fn is not None:
            last = eval_fn(self.max_steps)
        self.logger.close()
        return last


def resolve_max_steps(cfg, num_examples: int, global_batch: int) -> int:
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    steps = math.ceil(cfg.num_train_epochs * num_examples / global_batch)
    if steps <= 0:
        raise AlignError("max_steps is -1 and num_train_epochs gives no steps")
    return steps

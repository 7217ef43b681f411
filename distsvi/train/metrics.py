"""What a run reports: TensorBoard scalars (rank 0 only) and progress on the console.

Rank 0 gets a :class:`TensorBoardMetrics`; every other rank gets a :class:`NullMetrics`
that does nothing, so the loop never asks which rank it is on before logging.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

TAGS = (
    "loss/train",
    "loss/val",
    "loss/train_per_datapoint",
    "loss/val_per_datapoint",
    "optim/lr",
    "optim/grad_norm",
    "perf/samples_per_s",
    "perf/step_ms",
    "perf/allreduce_mb",
    "perf/peak_mem_mb",
    "health/skipped_steps",
)


class NullMetrics:
    """The do-nothing writer of ranks other than 0."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMetrics(NullMetrics):
    """Scalars and text into one TensorBoard event file under ``log_dir``.

    A write that fails (a full disk, a directory removed under the run) warns once and
    turns the writer off: losing events is no reason to lose the run.
    """

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir)
        _quiet_writer_thread()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            self._guard(lambda: [self.writer.add_scalar(t, v, step) for t, v in values.items()])

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self._guard(lambda: self.writer.add_text(tag, text))

    def close(self) -> None:
        if self.writer is not None:
            self._guard(self.writer.close)
            self.writer = None

    def _guard(self, write: Any) -> None:
        # The event writer writes in a thread of its own and raises its error at the next
        # call (or at close); after one error it writes nothing more.
        try:
            write()
        except OSError as e:
            writer, self.writer = self.writer, None
            with contextlib.suppress(Exception):
                writer.close()
            print(
                f"distsvi: warning: cannot write TensorBoard events in {self.log_dir} "
                f"({e.strerror or e}); training goes on without them. Free space there or "
                "set log.dir to another directory",
                file=sys.stderr,
                flush=True,
            )


def _quiet_writer_thread() -> None:
    """The event writer's thread re-raises its write error, which Python prints as a
    thread traceback; :class:`TensorBoardMetrics` reports it once instead."""
    previous = threading.excepthook
    if getattr(previous, "distsvi_quiet", False):
        return

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and "AsyncWriter" in type(args.thread).__name__:
            return
        previous(args)

    hook.distsvi_quiet = True
    threading.excepthook = hook


def make_metrics(is_main: bool, log_dir: str) -> NullMetrics:
    """TensorBoard on the main rank, the null writer elsewhere."""
    return TensorBoardMetrics(log_dir) if is_main else NullMetrics()


class Progress:
    """A tqdm bar on a terminal, plain log lines elsewhere (CI, cluster logs), or nothing.

    :param mode: ``auto``, ``bar``, ``log`` or ``none``; non-main ranks stay quiet.
    """

    def __init__(self, mode: str, is_main: bool, total: int, initial: int) -> None:
        self.is_main = is_main
        if not is_main:
            mode = "none"
        elif mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total = mode, total
        self.bar: object | None = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, step: int, values: dict[str, float]) -> None:
        """Report progress at ``step`` (a log step) with its scalars."""
        shown = {  # a validation step between log steps carries only loss/val
            "loss": ("loss/train", ".6g"),
            "val": ("loss/val", ".6g"),
            "lr": ("optim/lr", ".3g"),
            "samples/s": ("perf/samples_per_s", ".0f"),
            "ms/step": ("perf/step_ms", ".2f"),
        }
        parts = {k: format(values[tag], fmt) for k, (tag, fmt) in shown.items() if tag in values}
        if self.mode == "bar":
            self.bar.update(step - self.last)
            self.bar.set_postfix(parts)
        elif self.mode == "log":
            print(
                f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in parts.items()),
                flush=True,
            )
        self.last = step

    def message(self, text: str) -> None:
        """A line for the main rank's console (even with ``progress: none``), kept off the bar."""
        if self.mode == "bar":
            self.bar.write(text)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reset_peak_memory(device: Any = None) -> None:
    """Start :func:`peak_memory_mb` again from the memory in use now, so that the training
    loop's peak is not the data loading's: CUDA's peak statistics on a GPU; on Linux the
    process's resident high-water mark (``/proc/self/clear_refs``). Elsewhere the peak
    stays the process's."""
    import torch

    if device is not None and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: Any = None) -> float:
    """This process's peak memory, MiB, since :func:`reset_peak_memory` (or since it
    started): CUDA memory on a GPU, resident memory on CPU."""
    import torch

    if device is not None and getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Timer:
    """Wall time per step and samples per second between two log steps, leaving out the
    time spent on validation and checkpoints (:meth:`exclude`)."""

    def __init__(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def exclude(self) -> Iterator[None]:
        """Time in this block does not count as step time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def read(self, samples_per_step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "perf/step_ms": 1000 * elapsed / steps,
            "perf/samples_per_s": samples_per_step * steps / elapsed,
        }
        self.start, self.steps = time.perf_counter(), 0
        return out

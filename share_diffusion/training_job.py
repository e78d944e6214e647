"""One style training run in a background thread, with progress events and cancel.

The CLI and the app both train through :class:`TrainingJob`: the training runs in a worker thread
so that the caller stays free to show progress, to keep a page responsive, or to turn Ctrl-C into a
cancel request. A cancelled or failed training leaves the library as it was (see
:meth:`~share_diffusion.studio.Studio.train`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .studio import Studio, TrainResult
from .training import TrainingConfig, TrainingProgress

# How long events() waits on the queue at a time: short waits keep Ctrl-C responsive everywhere.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class TrainingPreview:
    """Sample images of the style being trained, made after `step`."""

    step: int
    images: list


class _Finished:
    """The worker's last event: the training ended, with a result or an error."""


class TrainingJob:
    """Learn one style with `Studio.train` (its `resume`, `hold_if_drifting` and `previews` too) in
    a thread named ``train-<name>``.

    Create it, `start` it, read `events` until they end, then call `result`, which re-raises the
    worker's error. `cancel` may be called from any thread, also before `start`.
    """

    def __init__(self, studio: Studio, images: list, name: str, trigger: str | None = None,
                 config: TrainingConfig | None = None, preset: str = "quick", resume: bool | None = None,
                 hold_if_drifting: bool = False, previews: int = 0):
        self._cancel = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._outcome: dict = {}

        def work() -> None:
            try:
                self._outcome["result"] = studio.train(
                    images, name, trigger=trigger, config=config, preset=preset, progress=self._events.put,
                    preview=lambda step, samples: self._events.put(TrainingPreview(step, samples)), cancel=self._cancel,
                    resume=resume, hold_if_drifting=hold_if_drifting, previews=previews)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller by result()
                self._outcome["error"] = error
            finally:
                self._events.put(_Finished())

        self._worker = threading.Thread(target=work, name=f"train-{name}", daemon=True)

    def start(self) -> TrainingJob:
        self._worker.start()
        return self

    def cancel(self) -> None:
        """Ask the training to stop at its next step; it then rolls back and `result` raises TrainingCancelled."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._worker.is_alive()

    def events(self) -> Iterator[TrainingProgress | TrainingPreview]:
        """Progress and previews as the worker reports them; ends when the training has ended."""
        while True:
            try:
                event = self._events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self._worker.is_alive():
                    continue
                return
            if isinstance(event, _Finished):
                return
            yield event

    def result(self) -> TrainResult:
        """Wait for the training to end; return its result or raise the worker's error."""
        self._worker.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]

    def stop(self) -> None:
        """Cancel the training if it still runs and wait until it has rolled back."""
        if self._worker.is_alive():
            self._cancel.set()
            self._worker.join()

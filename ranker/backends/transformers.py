"""In-process ranker backend: transformers (+ optional peft LoRA) on CPU, micro-batched.

Concurrent ``score`` calls put their prompts on one bounded queue; a batcher task takes up to
``max_batch`` prompts (waiting at most ``max_wait_ms`` for more after the first) and runs one
padded forward pass in a worker thread, so requests share passes and the event loop never
blocks. A full queue sheds load with ``RankerUnavailable`` instead of growing latency.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranker.backends.base import RankerUnavailable, RenderedPrompt
from tandem.priority import lower_thread_priority


@dataclass(frozen=True)
class TransformersBackendConfig:
    llm_dir: Path  # a plain HF checkpoint (`tandem llm prepare`)
    adapter_dir: Path | None = None  # a peft LoRA adapter trained by `tandem ranker train`
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto" (bf16 where the CPU has it)
    max_batch: int = 8  # prompts per forward pass
    max_wait_ms: float = 5.0  # how long the first prompt waits for company
    max_queue: int = 256  # prompts waiting beyond this are refused (RankerUnavailable)
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    nice: int = 0  # added to the forward thread's OS niceness: its passes yield the cores


@dataclass
class _Job:
    prompt: RenderedPrompt
    future: asyncio.Future


class TransformersBackend:
    """``RankerBackend`` running the model in this process."""

    name = "transformers"

    def __init__(self, config: TransformersBackendConfig, model=None, pad_id: int | None = None):
        """Cheap: weights load in ``start`` unless an already loaded ``model`` is given."""
        self.config = config
        self._model = model
        self._pad_id = pad_id
        self._hidden = None
        self._vocab = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- synchronous core (also used by offline evaluation) --------------------------------

    def load(self) -> None:
        """Load weights (idempotent)."""
        if self._model is None:
            import torch

            from ranker.llm import load_model

            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            self._model = load_model(self.config.llm_dir, self.config.adapter_dir)
        model_config = self._model.config
        self._hidden = self._model.get_input_embeddings().weight.shape[1]
        self._vocab = self._model.get_input_embeddings().weight.shape[0]
        if self._pad_id is None:
            pad = getattr(model_config, "pad_token_id", None)
            eos = getattr(model_config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) else eos
            self._pad_id = int(pad if pad is not None else eos if eos is not None else 0)

    @property
    def model(self):
        return self._model

    def check(self, prompts: Sequence[RenderedPrompt]) -> None:
        """Reject prompts this model cannot read (a caller bug, reported precisely)."""
        for n, prompt in enumerate(prompts):
            if not prompt.token_ids or not prompt.letter_token_ids:
                raise ValueError(f"prompt {n} has no tokens or no letters")
            top = max(max(prompt.token_ids), max(prompt.letter_token_ids))
            if top >= self._vocab:
                raise ValueError(f"prompt {n} has token id {top} >= vocab size {self._vocab}")
            if prompt.soft_positions and prompt.soft_vectors.shape[1] != self._hidden:
                raise ValueError(
                    f"prompt {n} soft vectors have size {prompt.soft_vectors.shape[1]}, "
                    f"the model's hidden size is {self._hidden}"
                )

    def score_sync(self, prompts: Sequence[RenderedPrompt]) -> list[np.ndarray]:
        """Letter log-probs of ``prompts`` in passes of at most ``max_batch`` (blocking)."""
        import torch

        from ranker.forward import autocast, collate_prompts, letter_log_softmax, letter_logits

        if self._vocab is None:
            self.load()
        self.check(prompts)
        out: list[np.ndarray] = []
        size = self.config.max_batch
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            batch, soft = collate_prompts(chunk, self._pad_id)
            with torch.inference_mode(), autocast(self.config.precision):
                scores = letter_log_softmax(letter_logits(self._model, batch, soft))
            scores = scores.numpy()
            out.extend(
                row[: p.num_candidates].astype(np.float32)
                for row, p in zip(scores, chunk, strict=True)
            )
        return out

    # -- RankerBackend ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="ranker-forward",
            initializer=lower_thread_priority,
            initargs=(self.config.nice,),
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.load)
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._task = asyncio.create_task(self._batcher(), name="ranker-batcher")

    async def score(
        self,
        prompts: Sequence[RenderedPrompt],
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Queue the prompts for the batcher and wait for their scores.

        The deadline is the caller's: cancelling this call withdraws its prompts that have not
        reached a forward pass yet. ``request_id`` is accepted for the protocol; the batcher
        mixes requests, so it has nowhere to send it.
        """
        if self._queue is None or self._task is None or self._task.done():
            raise RankerUnavailable("transformers backend is not started (call start())")
        self.check(prompts)
        loop = asyncio.get_running_loop()
        jobs = []
        for prompt in prompts:
            job = _Job(prompt, loop.create_future())
            try:
                self._queue.put_nowait(job)
            except asyncio.QueueFull:
                for queued in jobs:
                    queued.future.cancel()
                raise RankerUnavailable(
                    f"ranker queue is full ({self.config.max_queue} prompts waiting)"
                ) from None
            jobs.append(job)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:
            for job in jobs:
                job.future.cancel()

    async def ready(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
            self._queue = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _collect(self) -> list[_Job]:
        """The next batch: the first job, then whatever arrives within ``max_wait_ms``."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [job for job in batch if not job.future.done()]

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(
                    self._executor, self.score_sync, [job.prompt for job in batch]
                )
            except Exception as exc:  # the forward failed: every waiting request learns why
                error = RankerUnavailable(f"forward pass failed: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

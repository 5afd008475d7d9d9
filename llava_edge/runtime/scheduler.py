"""Which sequences run in the next engine step: admission by free KV slot, chunked prefill, removal.

Why prefill goes in chunks with fixed boundaries: a long image prompt prefilled in one call would
stall every running stream for its whole duration; cut into chunks of ``chunk`` tokens, a step holds at
most one chunk's worth of prefill (the token budget) before the decode of all running sequences.
Chunk boundaries depend only on the prompt (``[k*chunk, (k+1)*chunk)``), never on what else is
running, so a sequence goes through exactly the same backend calls alone as in a crowd, and greedy
tokens cannot change with the load.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from .sequence import Sequence, Status


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # prompt positions [start, end) go into the cache in this step
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.seq.prompt_len


class Scheduler:
    """Waiting queue (FIFO), running set (one KV slot each), and the per-step plan."""

    def __init__(self, max_slots: int, chunk: int | None, token_budget: int | None = None):
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.max_slots = max_slots
        self.chunk = chunk  # None: a whole prompt per call (backends that chunk internally)
        self.token_budget = token_budget or chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order (prefilling or decoding)
        self._free = list(range(max_slots))
        heapq.heapify(self._free)

    # -- bookkeeping ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Give free slots to waiting sequences (lowest slot first: keeps the decode rows compact)."""
        admitted = []
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            seq.status = Status.PREFILL
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out at once; its slot is free for the next step."""
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self._free, seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def slots_in_use(self) -> int:
        return self.max_slots - len(self._free)

    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- the plan for one step --------------------------------------------------------------------
    def prefill_plan(self) -> list[PrefillChunk]:
        """Whole chunks of prefilling sequences, oldest first, within the token budget (at least one)."""
        plan: list[PrefillChunk] = []
        spent = 0
        for seq in self.running:
            if seq.status is not Status.PREFILL or seq.embeds is None:  # not admitted fully yet (vision)
                continue
            start = seq.computed
            if self.chunk is None:
                end = seq.prompt_len
            else:
                # next boundary counted from where this sequence's own prefill began (after a prefix hit)
                base = seq.prefill_start
                end = min(seq.prompt_len, base + ((start - base) // self.chunk + 1) * self.chunk)
            if plan and self.token_budget is not None and spent + (end - start) > self.token_budget:
                break
            plan.append(PrefillChunk(seq, start, end))
            spent += end - start
        return plan

    def decode_batch(self) -> list[Sequence]:
        return [s for s in self.running if s.status is Status.RUNNING]

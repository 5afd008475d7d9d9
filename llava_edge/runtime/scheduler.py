"""Which sequences run in the next engine step: admission by free KV slot, chunked prefill within a
per-step budget, removal.

Stall-free batching (after Sarathi-Serve): every step decodes every running sequence (decode is never
skipped or delayed for a prefill), and the prefill that rides along is bounded in *time*, as a multiple
of that decode call's own cost: with ``prefill_budget`` b, a step lasts at most about (1 + b) decode calls,
so a running stream's token gap stays within (1 + b) times its steady gap however large the newcomer's
image prompt is. The budget is spent in whole chunks, costed by what prefill has measured so far
(``StepCosts``); at least one chunk runs per step so a prompt always advances, which is why the chunk
must be small enough to fit the budget on its own (``prefill_chunk``). A step with nothing to decode has
no stream to protect and prefills up to ``IDLE_PREFILL_MS`` (a newcomer alone gets its prompt in few
steps; arrivals still get admitted, and their vision encoder started, within about that time).

Why prefill goes in chunks with fixed boundaries: chunk boundaries depend only on the prompt
(``[k*chunk, (k+1)*chunk)`` from where the sequence's own prefill began), never on what else is running
or on measured times, so a sequence goes through exactly the same backend calls alone as in a crowd,
and greedy tokens cannot change with the load. The budget only decides how many of those chunks run in
one step.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from .sequence import Sequence, Status

# Prompt tokens per prefill call. One chunk size per engine keeps greedy tokens independent of the load;
# the size itself is a trade (docs/serving.md "Stall-free scheduling", measured on edge-1b int4): every
# prefill call streams the decoder's weights once, as a decode call does, so small chunks cost prefill time
# (per token, 16 costs ~1.6x what 256 does) and large ones stall the streams running beside them.
# - A server runs several streams: 16 tokens fit a step's budget, so a newcomer's image prompt never
#   freezes the others (SERVE_PREFILL_CHUNK: serve's --prefill-chunk, bench-serve's started server).
# - run, chat, watch and eval run one stream at a time: nothing to protect, so the fastest first token
#   (PREFILL_CHUNK: Pipeline's engines; the TensorRT in-place layout has its own, trt/presets.py
#   STATIC_PREFILL_CHUNK, also 256, since trt/ and runtime/ import each other nowhere).
PREFILL_CHUNK = 256
SERVE_PREFILL_CHUNK = 16
# The prefill time a step may add while sequences decode, in decode calls (2: a running stream's token gap
# stays within about 3x its steady gap).
PREFILL_BUDGET = 2.0

# Prefill a step may run when nothing decodes: no stream is stalled, but the engine only admits new
# requests (and starts their vision encoder) between steps, so a step is kept about this short.
IDLE_PREFILL_MS = 250.0


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # prompt positions [start, end) go into the cache in this step
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.seq.prompt_len

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepCosts:
    """What the engine's backend calls have cost, as exponential moving averages (``weight`` on the newest):
    prefill per prompt token, and a decode call per number of rows. The budget is in decode calls, so
    the numbers only need to be right relative to each other, on this machine, under its current load.

    The engine does not report calls that ran beside the vision encoder (``Engine._run``): they share the
    cores with it (a 3-row decode on edge-1b, 2 cores: ~54 ms alone, 150-200 ms beside the encoder), and
    an estimate inflated by them made the first steps after the encoder finished carry two or three
    chunks each (steps of 480 ms against a steady 87), the stall the budget exists to prevent."""

    weight: float = 0.3
    prefill_ms_per_token: float | None = None
    decode_ms: dict[int, float] = field(default_factory=dict)  # rows in the call -> ms

    def observe_prefill(self, tokens: int, ms: float) -> None:
        if tokens > 0:
            self.prefill_ms_per_token = self._mix(self.prefill_ms_per_token, ms / tokens)

    def observe_decode(self, rows: int, ms: float) -> None:
        self.decode_ms[rows] = self._mix(self.decode_ms.get(rows), ms)

    def decode_estimate(self, rows: int) -> float | None:
        """A decode call of ``rows`` rows: measured at that size, else the nearest smaller size measured
        (a call never costs less with more rows), else unknown."""
        known = [n for n in self.decode_ms if n <= rows]
        return self.decode_ms[max(known)] if known else None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new


class Scheduler:
    """Waiting queue (FIFO), running set (one KV slot each), and the per-step plan.

    ``chunk``: prompt tokens per prefill call (None: a whole prompt per call, for backends that chunk
    internally). ``prefill_budget``: prefill time per step as a multiple of the step's decode call (None:
    no time bound, only ``token_budget``). ``token_budget``: at most this many prefill tokens per step
    (None: no token bound, or one chunk when there is no time bound either). Either way at least one
    chunk runs per step."""

    def __init__(self, max_slots: int, chunk: int | None, token_budget: int | None = None,
                 prefill_budget: float | None = None, idle_prefill_ms: float = IDLE_PREFILL_MS):
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if prefill_budget is not None and prefill_budget < 0:
            raise ValueError("prefill_budget must be >= 0")
        self.max_slots = max_slots
        self.chunk = chunk
        # neither budget given: one chunk's worth of prefill per step (what a step held before the time budget)
        self.token_budget = token_budget if token_budget is not None or prefill_budget is not None else chunk
        self.prefill_budget = prefill_budget
        self.idle_prefill_ms = idle_prefill_ms
        self.costs = StepCosts()
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
    def prefill_time_budget(self) -> float | None:
        """Milliseconds of prefill this step may hold: ``prefill_budget`` times the cost of the decode call
        that follows it (IDLE_PREFILL_MS when nothing decodes); None: unknown yet, or no time bound."""
        if self.prefill_budget is None:
            return None
        rows = len(self.decode_batch())
        if not rows:
            return self.idle_prefill_ms
        decode = self.costs.decode_estimate(rows)
        return None if decode is None else self.prefill_budget * decode

    def prefill_plan(self) -> list[PrefillChunk]:
        """Whole chunks of prefilling sequences, oldest sequence first and each one's chunks in order,
        while they fit the step's token and time budgets (always at least one chunk). With a time budget
        whose costs are not measured yet, one chunk (it measures them)."""
        plan: list[PrefillChunk] = []
        time_budget = self.prefill_time_budget()
        per_token = self.costs.prefill_ms_per_token
        timed = self.prefill_budget is not None
        tokens, ms = 0, 0.0
        for seq in self.running:
            if seq.status is not Status.PREFILL or seq.embeds is None:  # not admitted fully yet (vision)
                continue
            start = seq.computed
            while start < seq.prompt_len:
                chunk = PrefillChunk(seq, start, self._chunk_end(seq, start))
                if plan:
                    if self.token_budget is not None and tokens + chunk.tokens > self.token_budget:
                        return plan
                    if timed and (time_budget is None or per_token is None
                                  or ms + per_token * chunk.tokens > time_budget):
                        return plan
                plan.append(chunk)
                tokens += chunk.tokens
                ms += (per_token or 0.0) * chunk.tokens
                start = chunk.end
        return plan

    def _chunk_end(self, seq: Sequence, start: int) -> int:
        """The next chunk boundary after ``start``: counted from where this sequence's own prefill began
        (after a prefix hit), never from anything else, so the boundaries are the same under any load."""
        if self.chunk is None:
            return seq.prompt_len
        base = seq.prefill_start
        return min(seq.prompt_len, base + ((start - base) // self.chunk + 1) * self.chunk)

    def decode_batch(self) -> list[Sequence]:
        return [s for s in self.running if s.status is Status.RUNNING]

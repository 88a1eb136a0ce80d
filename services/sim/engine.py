"""Discrete-event core: continuous-batching GPUs fed by the live request queue and clock policy objects.

Events are per batch change, never per token: between two changes (a request joins or leaves, the
clock moves) a GPU's batch is fixed, so k decode steps take the closed form
T(k) = k * (a(b) + c * C0) + c * b * k (k - 1) / 2 (C0 the batch's context, growing b tokens a step).
A request joins at the next step boundary (the in-progress step is found by solving T(k) <= elapsed);
a new clock, like in the live worker, applies from the next step. Prefill-or-decode steps as in the
worker: newcomers are prefilled (one after the other) before the batch decodes again.

The queue (`make_request_queue`), the clock policy (`make_clock_policy`) and the exec-time model
(`LinearExecModel`) are the live objects, unchanged: every control interval each GPU's policy gets a
QueueSnapshot built like powerd builds one from scheduler telemetry (its share of the group's queue,
plus its own running work), and the queue orders requests by predicted exec time.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from services.powerd.policy import ClockPolicy, QueueSnapshot, make_clock_policy
from services.powerd.sim_gpu import GpuProfile
from services.scheduler.exec_model import LinearExecModel
from services.scheduler.request_queue import QueuedRequest, SchedulingPolicy, make_request_queue
from services.sim.predictor import ConfusionPredictor, predict_tokens
from services.sim.step_model import StepModel
from services.sim.workload import Workload

__all__ = ["SimConfig", "SimResult", "simulate"]

FloatArray = npt.NDArray[np.float64]

_IDLE, _PREFILL, _DECODE = 0, 1, 2


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster: GPUs of one profile serving one model group."""

    profile: GpuProfile
    step_model: StepModel
    gpus: int = 4
    slots: int = 8  # sequences per GPU (the worker's max_seqs)
    scheduling: str = "ssjf"
    clock_policy: str = "max-clock"
    clock_policy_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sensitivity: float = 0.6  # the model's s as the policy is told it (QueueSnapshot.sensitivity)
    slo_scale: float = 5.0  # a request's SLO: JCT <= slo_scale x its time alone at max clock
    control_interval_s: float = 0.5  # powerd decisions, one per fresh scheduler telemetry
    # Arrival rate and mean predicted exec time in the snapshot: over arrivals in this window.
    rate_window_s: float = 20.0
    attainment_window_s: float = 60.0  # SLO attainment in the snapshot: requests completed in this window
    aging_factor: float = 8.0
    max_wait_ms: float = 60_000.0
    timeline_bin_s: float = 10.0
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.slots < 1:
            raise ValueError(f"need gpus >= 1 and slots >= 1, got {self.gpus}, {self.slots}")
        if self.slo_scale <= 0 or self.control_interval_s <= 0 or self.timeline_bin_s <= 0:
            raise ValueError("slo_scale, control_interval_s and timeline_bin_s must be positive")
        if self.rate_window_s < self.control_interval_s:
            raise ValueError("rate_window_s must be >= control_interval_s")
        SchedulingPolicy(self.scheduling)  # reject unknown names early


@dataclass
class SimResult:
    """Everything one run measured (all from the simulated GPU)."""

    config: SimConfig
    workload: str
    arrival_s: FloatArray
    output_tokens: npt.NDArray[np.int64]
    jct_ms: FloatArray
    ttft_ms: FloatArray
    wait_ms: FloatArray
    slo_ms: FloatArray
    queued: npt.NDArray[np.bool_]  # waited in the group queue for a free slot
    energy_j: FloatArray  # per GPU
    busy_s: FloatArray  # per GPU
    clock_busy_mhz_s: FloatArray  # per GPU: integral of the clock over busy time
    makespan_s: float
    timeline_power_w: FloatArray  # cluster power, mean per bin
    timeline_clock_mhz: FloatArray  # mean clock over GPUs, per bin
    clock_changes: int
    events: int
    wall_s: float
    predictor: str

    @property
    def slo_attainment(self) -> float:
        """Fraction of requests whose JCT met their SLO."""
        return float(np.mean(self.jct_ms <= self.slo_ms)) if len(self.jct_ms) else math.nan

    @property
    def total_energy_j(self) -> float:
        """Energy of all GPUs over the makespan."""
        return float(self.energy_j.sum())

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of this run."""
        jct = self.jct_ms
        busy = float(self.busy_s.sum())
        return {
            "scheduling": self.config.scheduling,
            "clock_policy": self.config.clock_policy,
            "requests": len(jct),
            "gpus": self.config.gpus,
            "makespan_s": round(self.makespan_s, 3),
            "energy_j": round(self.total_energy_j, 1),
            "mean_power_w": round(self.total_energy_j / self.makespan_s, 2) if self.makespan_s > 0 else None,
            "mean_power_per_gpu_w": (
                round(self.total_energy_j / self.makespan_s / self.config.gpus, 2)
                if self.makespan_s
                else None
            ),
            "energy_per_request_j": round(self.total_energy_j / len(jct), 2) if len(jct) else None,
            "slo_attainment": round(self.slo_attainment, 5),
            "mean_jct_ms": round(float(jct.mean()), 1),
            "p50_jct_ms": round(float(np.percentile(jct, 50)), 1),
            "p99_jct_ms": round(float(np.percentile(jct, 99)), 1),
            "mean_ttft_ms": round(float(self.ttft_ms.mean()), 1),
            "p99_ttft_ms": round(float(np.percentile(self.ttft_ms, 99)), 1),
            "mean_wait_ms": round(float(self.wait_ms.mean()), 1),
            "queued_fraction": round(float(self.queued.mean()), 4),
            "utilization": round(busy / (self.makespan_s * self.config.gpus), 4) if self.makespan_s else None,
            "mean_busy_clock_mhz": round(float(self.clock_busy_mhz_s.sum()) / busy, 1) if busy > 0 else None,
            "clock_changes": self.clock_changes,
            "events": self.events,
            "wall_s": round(self.wall_s, 3),
            "simulated": True,
        }


class _Gpu:
    """State of one simulated GPU."""

    __slots__ = (
        "bc_busy",
        "bcb",
        "bcb1",
        "busy_s",
        "clock",
        "clock_busy",
        "energy",
        "fmax_ms",
        "free",
        "idx",
        "pending",
        "pending_clock",
        "phase",
        "policy",
        "power",
        "power_t",
        "pre_comp",
        "pre_mem",
        "prefilling",
        "row_fin",
        "row_join",
        "row_req",
        "seg_dur1",
        "seg_k",
        "seg_t0",
        "step0",
        "step01",
        "steps",
        "sum_c0",
        "version",
        "x",
    )

    def __init__(self, idx: int, policy: ClockPolicy, clock: int, max_clock: int, slots: int) -> None:
        self.idx = idx
        self.policy = policy
        self.clock = clock
        self.x = max_clock / clock  # fmax / f
        self.pending_clock: int | None = None
        self.phase = _IDLE
        self.row_req: list[int] = []
        self.row_fin: list[int] = []  # step count at which the row has all its tokens
        self.row_join: list[int] = []  # step count when the row joined the decode batch
        self.pending: list[int] = []  # assigned, waiting for the next step boundary
        self.prefilling: list[int] = []
        self.free = slots
        self.steps = 0  # decode steps done so far
        self.sum_c0 = 0  # context of the batch = sum_c0 + batch * steps
        self.fmax_ms = 0.0  # busy time converted to max clock (for exec-time observations)
        self.seg_t0 = 0.0
        self.seg_k = 0
        self.seg_dur1 = 0.0
        self.pre_mem = self.pre_comp = 0.0  # the prefill segment left: clock-free and clock-bound ms
        self.step0 = self.bcb = self.step01 = self.bcb1 = 0.0
        self.version = 0
        self.energy = 0.0
        self.power = 0.0
        self.power_t = 0.0
        self.busy_s = 0.0
        self.clock_busy = 0.0
        self.bc_busy = False


def _steps_within(step0: float, bcb: float, dt_ms: float) -> int:
    """Largest k with k * step0 + bcb * k (k - 1) / 2 <= dt_ms."""
    if dt_ms <= 0:
        return 0
    if bcb <= 0:
        k = int(dt_ms // step0)
    else:
        beta = step0 - bcb / 2.0
        k = int((-beta + math.sqrt(beta * beta + 2.0 * bcb * dt_ms)) / bcb)
    k = max(k, 0)
    while (k + 1) * step0 + bcb * (k + 1) * k / 2.0 <= dt_ms:
        k += 1
    while k > 0 and k * step0 + bcb * k * (k - 1) / 2.0 > dt_ms:
        k -= 1
    return k


def simulate(
    workload: Workload,
    config: SimConfig,
    predictor: ConfusionPredictor | None = None,
) -> SimResult:
    """Run one workload through one configuration; predictor None = the predictor is exact."""
    started = time.perf_counter()
    cfg = config
    sm = cfg.step_model
    profile = cfg.profile
    n = len(workload)
    if n == 0:
        raise ValueError("empty workload")
    rng = np.random.default_rng(cfg.seed)
    oracle = cfg.scheduling == SchedulingPolicy.ORACLE.value
    pred_tok_arr, _ = predict_tokens(workload.output_tokens, None if oracle else predictor, rng)
    solo_ms = sm.solo_ms(workload.prompt_tokens, workload.output_tokens)

    arrival = workload.arrival_s.tolist()
    prompt = workload.prompt_tokens.tolist()
    out = workload.output_tokens.tolist()
    pred_tok = pred_tok_arr.tolist()
    pred_exec = [0.0] * n
    deadline = [0.0] * n  # scheduler-side: arrival + slo_scale x estimated solo time (predicted length)
    dispatch_t = [0.0] * n
    first_t = [0.0] * n
    finish_t = [0.0] * n
    fmax_at_dispatch = [0.0] * n
    queued = [False] * n  # waited in the group queue (no GPU had a free slot on arrival)

    clocks = profile.supported_clocks_mhz()
    max_clock = max(clocks)
    busy_power = {c: profile.power_at(c, 1.0) for c in clocks}
    idle_power = profile.power_at(max_clock, 0.0)
    slots = cfg.slots
    queue = make_request_queue(
        cfg.scheduling,
        **(
            {}
            if cfg.scheduling == "fcfs"
            else {"aging_factor": cfg.aging_factor, "max_wait_ms": cfg.max_wait_ms}
        ),
    )
    # Exec-time priors: a mean prompt's prefill and one decode step at half the slots, then fitted online.
    mean_prompt = float(np.mean(workload.prompt_tokens))
    half = max(slots // 2, 1)
    exec_model = LinearExecModel(
        const_ms=sm.prefill_ms(mean_prompt),
        ms_per_token=sm.decode_ms(half, half * (mean_prompt + float(np.mean(pred_tok_arr)) / 2.0)),
    )
    const_ms, ms_per_token = exec_model.coefficients()

    gpus = [
        _Gpu(
            i,
            make_clock_policy(cfg.clock_policy, **dict(cfg.clock_policy_kwargs)),
            max_clock,
            max_clock,
            slots,
        )
        for i in range(cfg.gpus)
    ]
    free_sets: list[set[int]] = [set() for _ in range(slots + 1)]
    free_sets[slots].update(range(cfg.gpus))

    # Step-model constants, split into the clock-bound part (times fmax / f) and the rest.
    # Each term's fixed and clock-bound part at max clock (a0 + a0c x: x = fmax / f).
    a0, a0c, a1m, a1, c_mem, c_comp = sm.decode_terms()
    p0, p0c, p1m, p1, p2m, p2 = sm.prefill_terms()

    # Cluster timeline: total power and total clock are piecewise constant; integrate them into bins.
    bin_s = cfg.timeline_bin_s
    n_bins = int(workload.duration_s * 1.5 / bin_s) + 16
    tl_power = [0.0] * n_bins
    tl_clock = [0.0] * n_bins
    tl = {"t": 0.0, "power": idle_power * cfg.gpus, "clock": float(max_clock * cfg.gpus)}

    def timeline_to(t: float) -> None:
        t0 = tl["t"]
        if t <= t0:
            return
        pw, ck = tl["power"], tl["clock"]
        while t0 < t:
            b = int(t0 / bin_s)
            end = min((b + 1) * bin_s, t)
            if b >= len(tl_power):
                grow = b - len(tl_power) + 16
                tl_power.extend([0.0] * grow)
                tl_clock.extend([0.0] * grow)
            tl_power[b] += pw * (end - t0)
            tl_clock[b] += ck * (end - t0)
            t0 = end
        tl["t"] = t

    for g in gpus:
        g.power = idle_power

    def set_power(g: _Gpu, t: float, busy: bool, clock: int) -> None:
        """Close g's constant-power segment at t, then switch to (busy, clock)."""
        dt = t - g.power_t
        if dt > 0:
            g.energy += g.power * dt
            if g.bc_busy:
                g.busy_s += dt
                g.clock_busy += g.clock * dt
        g.power_t = t
        new_power = busy_power[clock] if busy else idle_power
        if new_power != g.power or clock != g.clock:
            timeline_to(t)
            tl["power"] += new_power - g.power
            tl["clock"] += clock - g.clock
        g.power = new_power
        g.bc_busy = busy
        if clock != g.clock:
            g.clock = clock
            g.x = max_clock / clock

    heap: list[tuple[float, int, int, int]] = []
    seq = 0

    def rebucket(g: _Gpu) -> None:
        free = slots - len(g.row_req) - len(g.pending) - len(g.prefilling)
        if free != g.free:
            free_sets[g.free].discard(g.idx)
            free_sets[free].add(g.idx)
            g.free = free

    def plan_decode(g: _Gpu, t: float) -> None:
        nonlocal seq
        b = len(g.row_req)
        c0 = g.sum_c0 + b * g.steps
        k = min(g.row_fin) - g.steps
        x = g.x
        g.step0 = a0 + a0c * x + (a1m + a1 * x) * b + (c_mem + c_comp * x) * c0
        g.bcb = (c_mem + c_comp * x) * b
        g.step01 = a0 + a0c + (a1m + a1) * b + (c_mem + c_comp) * c0
        g.bcb1 = (c_mem + c_comp) * b
        g.seg_t0 = t
        g.seg_k = k
        g.phase = _DECODE
        g.version += 1
        seq += 1
        dur_ms = k * g.step0 + g.bcb * k * (k - 1) / 2.0
        heapq.heappush(heap, (t + dur_ms / 1000.0, seq, g.idx, g.version))

    def plan_prefill(g: _Gpu, t: float, mem: float, comp: float) -> None:
        nonlocal seq
        g.pre_mem, g.pre_comp = mem, comp
        g.seg_t0 = t
        g.version += 1
        seq += 1
        heapq.heappush(heap, (t + (mem + comp * g.x) / 1000.0, seq, g.idx, g.version))

    def reclock_prefill(g: _Gpu, t: float, clock: int) -> None:
        """A new clock in the middle of a prefill applies at once (the GPU changes clock mid-kernel)."""
        total = g.pre_mem + g.pre_comp * g.x
        left = 1.0 - min((t - g.seg_t0) * 1000.0 / total, 1.0) if total > 0 else 0.0
        set_power(g, t, True, clock)
        plan_prefill(g, t, g.pre_mem * left, g.pre_comp * left)

    def start_next(g: _Gpu, t: float) -> None:
        """At a step boundary (or on an idle GPU): new clock, pull work, start the next segment."""
        nonlocal seq
        clock = g.clock
        if g.pending_clock is not None:
            clock = g.pending_clock
            g.pending_clock = None
        free = slots - len(g.row_req) - len(g.pending)
        while free > 0 and len(queue):
            req = queue.pop(t)
            if req is None:
                break
            g.pending.append(req.payload)
            free -= 1
        if g.pending:
            mem = comp = 0.0
            for r in g.pending:
                p = prompt[r]
                dispatch_t[r] = t
                fmax_at_dispatch[r] = g.fmax_ms
                comp += p0c + p1 * p + p2 * p * p
                mem += p0 + p1m * p + p2m * p * p
            g.prefilling = g.pending
            g.pending = []
            g.seg_dur1 = mem + comp
            g.phase = _PREFILL
            set_power(g, t, True, clock)
            plan_prefill(g, t, mem, comp)
        elif g.row_req:
            set_power(g, t, True, clock)
            plan_decode(g, t)
        else:
            g.phase = _IDLE
            set_power(g, t, False, clock)
        rebucket(g)

    completed = 0
    slo_list = (cfg.slo_scale * solo_ms).tolist()
    # (finish time, not missed because of the clock) of recent completions: the policy's feedback, as
    # the live scheduler's clock_slo_attainment (a miss that max clock would not have avoided is not
    # the clock's doing).
    recent: deque[tuple[float, bool]] = deque()
    recent_met = 0

    def complete(g: _Gpu, r: int, t: float) -> None:
        nonlocal completed, recent_met
        finish_t[r] = t
        completed += 1
        exec_model.observe(out[r], g.fmax_ms - fmax_at_dispatch[r])
        jct_ms = (t - arrival[r]) * 1000.0
        stretch_ms = max((t - dispatch_t[r]) * 1000.0 - (g.fmax_ms - fmax_at_dispatch[r]), 0.0)
        ok = jct_ms <= slo_list[r] or jct_ms - stretch_ms > slo_list[r]
        recent.append((t, ok))
        recent_met += ok

    def boundary(g: _Gpu, t: float) -> None:
        """g's segment ended at t: prefilled rows join the batch, finished rows leave."""
        if g.phase == _PREFILL:
            g.fmax_ms += g.seg_dur1
            s = g.steps
            for r in g.prefilling:
                first_t[r] = t
                if out[r] <= 1:
                    complete(g, r, t)
                    continue
                g.row_req.append(r)
                g.row_fin.append(s + out[r] - 1)
                g.row_join.append(s)
                g.sum_c0 += prompt[r] + 1 - s
            g.prefilling = []
        elif g.phase == _DECODE:
            k = g.seg_k
            g.fmax_ms += k * g.step01 + g.bcb1 * k * (k - 1) / 2.0
            g.steps += k
            s = g.steps
            fins = g.row_fin
            if min(fins) <= s:
                keep_req: list[int] = []
                keep_fin: list[int] = []
                keep_join: list[int] = []
                for r, fin, join in zip(g.row_req, fins, g.row_join, strict=True):
                    if fin <= s:
                        g.sum_c0 -= prompt[r] + 1 - join
                        complete(g, r, t)
                    else:
                        keep_req.append(r)
                        keep_fin.append(fin)
                        keep_join.append(join)
                g.row_req, g.row_fin, g.row_join = keep_req, keep_fin, keep_join
        start_next(g, t)

    def interrupt(g: _Gpu, t: float) -> None:
        """End g's decode segment at the step boundary after t (something must happen there)."""
        nonlocal seq
        done = _steps_within(g.step0, g.bcb, (t - g.seg_t0) * 1000.0)
        k = done + 1
        if k >= g.seg_k:
            return  # the planned event is that boundary already
        g.seg_k = k
        g.version += 1
        seq += 1
        dur_ms = k * g.step0 + g.bcb * k * (k - 1) / 2.0
        heapq.heappush(heap, (g.seg_t0 + dur_ms / 1000.0, seq, g.idx, g.version))

    per_ctx = c_mem + c_comp
    solo_step = a0 + a0c + a1m + a1
    # Prefill totals at max clock (the scheduler's solo estimate).
    q0, q1, q2 = p0 + p0c, p1 + p1m, p2 + p2m

    def solo_est_ms(p: int, tokens: float) -> float:
        """The scheduler's estimate of a request's time alone at max clock (step model, given length)."""
        steps = max(tokens - 1.0, 0.0)
        decode = steps * solo_step + per_ctx * (steps * (p + 1.0) + steps * (steps - 1.0) / 2.0)
        return q0 + q1 * p + q2 * p * p + decode

    def in_flight(g: _Gpu, t: float) -> tuple[float, float | None]:
        """Predicted work left on g (as the scheduler's telemetry counts it) and its tightest slack."""
        work = 0.0
        slack = math.inf
        t_ms = t * 1000.0
        for waiting in (g.pending, g.prefilling):
            for r in waiting:
                pe = pred_exec[r]
                work += pe
                ratio = (deadline[r] * 1000.0 - t_ms) / (pe if pe > 1e-9 else 1e-9)
                if ratio < slack:
                    slack = ratio
        if g.row_req:
            s = g.steps
            if g.phase == _DECODE:
                s += _steps_within(g.step0, g.bcb, t_ms - g.seg_t0 * 1000.0)
            mpt = ms_per_token if ms_per_token > 1e-9 else 1e-9
            # Locals: this loop runs for every GPU at every control tick (the simulator's hot spot).
            ptok, dl, arr, pr = pred_tok, deadline, arrival, prompt
            s1 = s + 1
            for r, join in zip(g.row_req, g.row_join):  # noqa: B905 - equal by construction
                done = s1 - join
                left = ptok[r] - done
                if left > 0:
                    due_ms = dl[r] * 1000.0
                else:
                    # Outlived its prediction: as much again (the scheduler's rule), due at the SLO
                    # of that longer answer.
                    left = done if done > 1 else 1
                    due_ms = arr[r] * 1000.0 + slo_scale * solo_est_ms(pr[r], done + left)
                left_ms = left * mpt
                work += left_ms
                ratio = (due_ms - t_ms) / left_ms
                if ratio < slack:
                    slack = ratio
        return work, (None if slack == math.inf else slack)

    # Telemetry state.
    window_ticks = max(round(cfg.rate_window_s / cfg.control_interval_s), 1)
    arrivals_ring: deque[int] = deque([0] * window_ticks, maxlen=window_ticks)
    exec_ring: deque[float] = deque([0.0] * window_ticks, maxlen=window_ticks)
    tick_arrivals = 0
    tick_exec_sum = 0.0
    mean_exec_ms = 0.0
    share = 1.0 / cfg.gpus
    queue_slots = slots * cfg.gpus
    clock_changes = 0
    policy_s = cfg.sensitivity
    slo_scale = cfg.slo_scale
    interval = cfg.control_interval_s

    def tick(t: float) -> None:
        nonlocal tick_arrivals, tick_exec_sum, mean_exec_ms, const_ms, ms_per_token, clock_changes, recent_met
        arrivals_ring.append(tick_arrivals)
        exec_ring.append(tick_exec_sum)
        in_window = sum(arrivals_ring)
        if in_window:
            mean_exec_ms = sum(exec_ring) / in_window
        tick_arrivals = 0
        tick_exec_sum = 0.0
        const_ms, ms_per_token = exec_model.coefficients()
        horizon = t - cfg.attainment_window_s
        while recent and recent[0][0] < horizon:
            recent_met -= recent.popleft()[1]
        attainment = recent_met / len(recent) if recent else None
        window_s = min(window_ticks * interval, max(t, interval))
        rate = in_window / window_s
        depth = len(queue)
        q_work = queue.predicted_work_ms
        oldest = queue.oldest_arrival_s()
        oldest_ms = 0.0 if oldest is None else max(t - oldest, 0.0) * 1000.0
        depth_share = round(depth * share)
        # The queue's most urgent request: time left to its deadline over its predicted exec time.
        queue_slack = math.inf
        for req in queue:
            r = req.payload
            queue_slack = min(queue_slack, (deadline[r] - t) * 1000.0 / max(pred_exec[r], 1e-9))
        for g in gpus:
            work_ms, slack = in_flight(g, t)
            if queue_slack < math.inf:
                slack = queue_slack if slack is None else min(slack, queue_slack)
            snap = QueueSnapshot(
                depth=depth_share,
                running=len(g.row_req) + len(g.prefilling) + len(g.pending),
                predicted_work_ms=q_work * share + work_ms,
                oldest_wait_ms=oldest_ms,
                arrivals_per_s=rate * share,
                mean_exec_ms=mean_exec_ms,
                slots=slots,
                sensitivity=policy_s,
                slo_scale=slo_scale,
                slack_slowdown=slack,
                slo_attainment=attainment,
                queue_slots=queue_slots,
            )
            want = g.policy.choose_clock_mhz(snap, clocks, t)
            if want != (g.pending_clock if g.pending_clock is not None else g.clock):
                clock_changes += 1
                if g.phase == _IDLE:
                    set_power(g, t, False, want)
                elif g.phase == _PREFILL:
                    g.pending_clock = None
                    reclock_prefill(g, t, want)
                else:
                    # Decode: from the next step on (steps are milliseconds long).
                    g.pending_clock = None if want == g.clock else want
                    if g.pending_clock is not None:
                        interrupt(g, t)

    bar: Any = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=round(float(arrival[-1]), 1), unit="sim-s", desc=f"{cfg.scheduling}/{cfg.clock_policy}"
        )
    i = 0
    next_tick = 0.0
    events = 0
    inf = math.inf
    t = 0.0
    last_bar = 0.0
    while completed < n:
        ta = arrival[i] if i < n else inf
        th = heap[0][0] if heap else inf
        if th <= ta and th <= next_tick:
            t, _, gi, version = heapq.heappop(heap)
            g = gpus[gi]
            if version != g.version:
                continue
            events += 1
            boundary(g, t)
        elif ta <= next_tick:
            t = ta
            r = i
            i += 1
            events += 1
            pe = const_ms + ms_per_token * pred_tok[r]
            pred_exec[r] = pe
            deadline[r] = t + slo_scale * solo_est_ms(prompt[r], pred_tok[r]) / 1000.0
            tick_arrivals += 1
            tick_exec_sum += pe
            if not len(queue):
                for k in range(slots, 0, -1):
                    bucket = free_sets[k]
                    if bucket:
                        g = gpus[next(iter(bucket))]
                        g.pending.append(r)
                        rebucket(g)
                        if g.phase == _IDLE:
                            start_next(g, t)
                        elif g.phase == _DECODE:
                            interrupt(g, t)
                        break
                else:
                    queued[r] = True
                    queue.add(QueuedRequest(str(r), t, pe, payload=r))
            else:
                queued[r] = True
                queue.add(QueuedRequest(str(r), t, pe, payload=r))
        else:
            t = next_tick
            next_tick += interval
            tick(t)
            if bar is not None and t - last_bar >= 10.0:
                bar.update(round(min(t, float(arrival[-1])) - last_bar, 1))
                last_bar = min(t, float(arrival[-1]))
    if bar is not None:
        bar.update(max(round(float(arrival[-1]) - last_bar, 1), 0))
        bar.close()

    makespan = max(finish_t)
    for g in gpus:
        set_power(g, makespan, False, g.clock)
    timeline_to(makespan)
    used = max(math.ceil(makespan / bin_s), 1)
    widths = np.full(used, bin_s)
    widths[-1] = makespan - (used - 1) * bin_s
    arrival_np = workload.arrival_s
    finish = np.asarray(finish_t)
    return SimResult(
        config=cfg,
        workload=workload.name,
        arrival_s=arrival_np,
        output_tokens=workload.output_tokens,
        jct_ms=(finish - arrival_np) * 1000.0,
        ttft_ms=(np.asarray(first_t) - arrival_np) * 1000.0,
        wait_ms=(np.asarray(dispatch_t) - arrival_np) * 1000.0,
        slo_ms=cfg.slo_scale * solo_ms,
        queued=np.asarray(queued, dtype=np.bool_),
        energy_j=np.array([g.energy for g in gpus]),
        busy_s=np.array([g.busy_s for g in gpus]),
        clock_busy_mhz_s=np.array([g.clock_busy for g in gpus]),
        makespan_s=makespan,
        timeline_power_w=np.asarray(tl_power[:used]) / np.maximum(widths, 1e-12),
        timeline_clock_mhz=np.asarray(tl_clock[:used]) / np.maximum(widths, 1e-12) / cfg.gpus,
        clock_changes=clock_changes,
        events=events,
        wall_s=time.perf_counter() - started,
        predictor="oracle" if oracle or predictor is None else predictor.source,
    )

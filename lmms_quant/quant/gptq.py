"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error feedback.

H = sum of x x^T over the calibration tokens reaching the layer (collected block by block, so it
reflects the already-quantized blocks before it). With U the upper Cholesky factor of (H + λI)^-1
(computed from the reversed H, `gptq_reference.reversed_inverse_factor`),
column i is rounded, its error e_i = (w_i - q_i) / U_ii is spread over the not yet quantized
columns (w_j -= e_i U_ij), lazily: inside a block of ``block_size`` columns at once, to later
columns once per block.

- Groups: a group's (scale, zero) come from the error-updated columns when the loop enters it.
  With ``act_order`` (columns by decreasing H_jj; the default, llm-compressor's "static" act-order)
  the group parameters are *static*: computed up front on the original weight, so groups stay
  contiguous in the original column order.
- Dead inputs (H_jj = 0): H_jj := 1, which decouples that column; it is then plainly rounded.
  (The reference zeroes such columns; a channel that is silent on calibration data may not be silent
  on real inputs, so we keep it.)
- A layer whose H is all zero never saw data: `NoCalibrationData`, never a silent zeroing.
- The column loop of a block: on CUDA one Triton kernel (`gptq_kernel`), otherwise torch on fixed
  buffers, a CUDA graph where it can (`gptq_torch_loop`); either gives `gptq_reference`'s codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from lmms_quant.values import bad, parse_bool, parse_float, parse_positive_int

from . import gptq_kernel
from . import gptq_torch_loop as torch_loop
from .gptq_reference import lower_inverse
from .method import MethodConfig, RecipeError, option
from .quantizer import DeviceCheck, LayerResult, QuantGrid, QuantizedWeight, tf32_products
from .rtn_kernel import rtn_delta
from .span_clock import Later, SpanClock

NEEDS_HESSIAN = True
NEEDS_INPUTS = False


def _damp(key, value) -> float:
    valid = "a number in (0, 1], e.g. 0.01"
    damp = parse_float(key, value, valid, RecipeError)
    if not 0 < damp <= 1:
        raise bad(key, value, valid, error=RecipeError)
    return damp


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """damp: λ = damp · mean(diag H); act_order: columns by decreasing H_jj; block_size: lazy-update width."""

    damp: float = option("damp", 0.01, _damp)
    # On by default, as llm-compressor's GPTQ (static act-order): static groups stay contiguous, so it
    # costs nothing at inference, and it lowered the mean layer error of the shipped models by 9-16 %.
    act_order: bool = option("act_order", True, lambda k, v: parse_bool(k, v, RecipeError))
    block_size: int = option("block_size", 128, lambda k, v: parse_positive_int(k, v, "e.g. 128", RecipeError))


Config = GPTQConfig


class NoCalibrationData(RuntimeError):
    """The layer's Hessian is zero: no calibration token reached it."""


class HessianNotPositiveDefinite(RuntimeError):
    pass


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, *, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    return quantize_rows(weight, hessian, grid, damp=damp, block_size=block_size, act_order=act_order).qweight


@dataclass
class RowsResult:
    """GPTQ of a (possibly stacked) weight: the quantized weight and what its error costs.

    ``err_sq[r]`` = sum over columns of row r's scaled errors e_i^2: exactly tr(D H' D^T) for that row,
    D = W - W_hat, H' = H + λI + (1 on dead inputs), the matrix GPTQ factorised (W - W_hat = E U)."""

    qweight: QuantizedWeight
    err_sq: torch.Tensor  # float64 (rows,)
    lam: torch.Tensor  # 0-dim: λ added to H's diagonal
    dead: torch.Tensor  # bool (columns,)
    flags: torch.Tensor  # bool (2,): H had data, the damped H factored (`failure` reads them)


def failure(flags: list[bool], damp: float) -> Exception | None:
    """The error a run's flags (`RowsResult.flags`, as python bools) stand for, or None."""
    has_data, factored = flags
    if not has_data:
        return NoCalibrationData("the Hessian is zero: no calibration data reached this layer")
    if not factored:
        return HessianNotPositiveDefinite(f"the damped Hessian is not positive definite (damp={damp}); increase damp")
    return None


def quantize_rows(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, overwrite_hessian: bool = False) -> RowsResult:
    """GPTQ of ``weight`` given H. Rows are independent given H: stacking Linears that share an input
    (q/k/v, gate/up) and quantizing them at once gives each its own codes, with one damped Cholesky.
    ``overwrite_hessian``: damp ``hessian`` in place (saves a copy of in x in)."""
    return _complete(_Run(dict(weight=weight, hessian=hessian, grid=grid, damp=damp, block_size=block_size,
                               act_order=act_order, overwrite_hessian=overwrite_hessian)))


def _complete(run: "_Run", check: bool = True) -> RowsResult:
    for i1 in run.starts:
        run.block(i1)
    return run.finish(check)


def quantize_rows_concurrently(jobs, device, check: bool = True) -> list[RowsResult]:
    """Several independent `quantize_rows` calls (keyword dicts, an iterable consumed one at a time; each
    run takes its dict's weight and Hessian out of it, see `_Run`), for weights on ``device``.

    On CUDA each run has a stream of its own, from its preparation (making the job, the damped
    factorisation) to its column loop: a run's loop starts as soon as its own factor is ready, while
    a wider Hessian is still being factored on its stream (OPT's fc2: 10240 columns, against 2560
    for the unit's other groups). The loops, launch-bound chains of tiny kernels, are interleaved
    block by block, so the GPU runs them side by side. Every kernel and operand is the one a lone
    call uses: the codes are a lone call's. Elsewhere the runs go one after the other.

    ``check=False``: a run that failed (no data, not positive definite) raises nothing here; its
    ``flags`` say so (`failure`), and nothing waits for the device."""
    jobs = iter(jobs)
    if torch.device(device).type != "cuda":
        with record_function("lmms_quant.gptq.prepare"):  # named spans for torch.profiler
            runs = [_Run(job, slot=k) for k, job in enumerate(jobs)]
        return [_complete(run, check) for run in runs]
    main = torch.cuda.current_stream(device)
    runs, streams = [], []
    with record_function("lmms_quant.gptq.prepare"):
        while True:
            stream = _side_streams(device, len(runs) + 1)[-1]
            stream.wait_stream(main)  # the weights and Hessians were made there
            with torch.cuda.stream(stream):
                job = next(jobs, None)
                if job is None:
                    break
                runs.append(_Run(job, slot=len(runs), stream=stream))
                streams.append(stream)
    with record_function("lmms_quant.gptq.loops"):
        for step in range(max((len(run.starts) for run in runs), default=0)):
            for run, stream in zip(runs, streams):
                if step < len(run.starts):
                    with torch.cuda.stream(stream):
                        run.block(run.starts[step])
        for stream in streams:
            main.wait_stream(stream)
    with record_function("lmms_quant.gptq.finish"):
        return [run.finish(check) for run in runs]


_STREAMS: dict = {}


def _side_streams(device, n: int) -> list:
    """n side streams of ``device``, the same ones every call: cuBLAS keeps a workspace per stream it
    has run on (32 MiB on Hopper), so fresh streams from torch's pool of 32 would hold 1 GiB."""
    streams = _STREAMS.setdefault(str(device), [])
    while len(streams) < n:
        streams.append(torch.cuda.Stream(device=device))
    return streams[:n]


class _Run:
    """One GPTQ call: prepared up to its column loop (the part that waits on the device), then run a
    block at a time (`block`), then assembled (`finish`).

    ``job``: quantize_rows' keywords as a dict, from which the weight and Hessian are *taken*: when the
    caller keeps no other reference, the float32 weight and the original Hessian are freed as soon as
    their transposed / permuted copies exist (a LLaVA-7B down_proj's Hessian is 0.45 GiB)."""

    def __init__(self, job: dict, slot: int = 0, stream=None):
        weight, hessian = job.pop("weight"), job.pop("hessian")
        if stream is not None:  # made on another stream, read on this one: not reused before it is done
            weight.record_stream(stream)
            hessian.record_stream(stream)
        grid, damp, block_size = job["grid"], job.get("damp", 0.01), job.get("block_size", 128)
        act_order, overwrite_hessian = job.get("act_order", False), job.get("overwrite_hessian", False)
        W = weight.detach().float()  # only read here: the loop works on its transposed copy
        rows, columns = W.shape
        H = hessian.detach().float()  # a new tensor object; the same storage when already float32
        if not (overwrite_hessian and H.data_ptr() == hessian.data_ptr() and H.device == W.device):
            H = H.to(W.device, copy=True)
        del weight, hessian
        # Checked in `finish`, with the factorisation's status: one device read per run, where the
        # results are read anyway, so preparing runs never waits for the device.
        self.has_data = torch.any(H != 0)
        self.dead = dead = torch.diag(H) == 0
        H.diagonal().masked_fill_(dead, 1.0)

        self.grid, self.block_size = grid, block_size
        self.static = static = grid.granularity != "group" or act_order
        n_param_rows, n_groups = grid.param_shape(rows, columns)
        if static:
            scale, zero = grid.fit(W)
        else:
            scale = torch.zeros(n_param_rows, n_groups, device=W.device)
            zero = torch.zeros(n_param_rows, n_groups, device=W.device)
        column_group = grid.column_group(columns, device=W.device)  # per loop column, its cell column

        self.perm = None
        if act_order:
            self.perm = torch.argsort(torch.diag(H), descending=True)
            H = H[self.perm]  # one permuted copy alive beside the original at a time
            H = H[:, self.perm]
            column_group = column_group[self.perm]
        self.column_group_index, self._column_group = column_group, None

        lam = damp * torch.mean(torch.diag(H))
        H.diagonal().add_(lam)
        # U, the upper Cholesky factor of H^-1, from one Cholesky of the reversed H and one triangular
        # inverse (see `gptq_reference.reversed_inverse_factor`, the same steps); one copy of H alive.
        H = H.flip(0, 1)
        L, self.info = torch.linalg.cholesky_ex(H)  # info != 0: not positive definite (`finish` raises)
        del H
        self.lam, self.damp = lam, damp
        inverse_l = lower_inverse(L)
        del L
        self.U = inverse_l.flip(0, 1)
        del inverse_l

        # Transposed (and permuted) in one copy: a weight column is a contiguous row here, and every
        # per-column step is an in-place kernel on contiguous memory, with no host synchronisation.
        self.WT = W.T.index_select(0, self.perm) if self.perm is not None else W.T.contiguous()
        del W
        self.scaleT, self.zeroT = scale.T.contiguous(), zero.T.contiguous()
        self.deqT = torch.empty_like(self.WT)
        self.codesT = torch.empty(self.WT.shape, dtype=torch.uint8, device=self.WT.device)
        self.err_sq = torch.zeros(rows, dtype=torch.float64, device=self.WT.device)
        # A "regular" block is full and every group that starts in it also ends in it: its column loop
        # has one fixed kernel sequence, run on fixed buffers (`gptq_torch_loop.BlockLoop`), which on CUDA is captured
        # once per layer shape as a graph and replayed (the loop is launch-bound: 7 tiny kernels a column).
        # On CUDA with triton, a block's whole column loop is one kernel (`gptq_kernel`), same codes.
        regular_ok = static or (block_size % grid.group_size == 0)
        self.kernel = regular_ok and gptq_kernel.serves(self.WT)
        self.err_buf = torch.empty(block_size, rows, device=self.WT.device) if self.kernel else None
        self.loop = (torch_loop.BlockLoop.get(self.WT, self.scaleT.shape[1], block_size, grid, static, slot)
                     if regular_ok and not self.kernel else None)
        self.group_index = column_group if (self.loop is not None or self.kernel) and static else None
        self.columns = columns
        self.starts = list(range(0, columns, block_size))

    def block(self, i1: int) -> None:
        i2 = min(i1 + self.block_size, self.columns)
        Err1 = self._kernel_block(i1, i2) if self.kernel else None
        if Err1 is None:
            Err1 = self._torch_block(i1, i2)
        self.err_sq += Err1.double().square().sum(dim=0)
        self.WT[i2:].addmm_(self.U[i1:i2, i2:].T, Err1, alpha=-1)

    def _torch_block(self, i1: int, i2: int) -> torch.Tensor:
        if self.loop is not None and i2 - i1 == self.block_size:
            return self.loop.run(self.WT, self.U, self.scaleT, self.zeroT, self.deqT, self.codesT, i1, i2,
                                 self.column_group, self.group_index)
        return torch_loop.irregular_block(self.WT, self.U, self.scaleT, self.zeroT, self.deqT, self.codesT, i1, i2,
                                          self.column_group, self.grid, self.static)

    def _kernel_block(self, i1: int, i2: int) -> torch.Tensor | None:
        """The block by the Triton kernel, or None when it cannot launch (then it never serves again)."""
        try:
            return gptq_kernel.run_block(self.WT, self.U, self.scaleT, self.zeroT, self.group_index, self.deqT,
                                         self.codesT, self.err_buf, i1, i2, self.grid, self.static)
        except Exception as err:  # compiling the kernel failed (it writes nothing before it runs)
            if not gptq_kernel.fall_back(err):
                raise
            self.kernel = False  # this layer goes on kernel by kernel; later ones use the graphed loop
            return None

    @property
    def column_group(self) -> list[int]:
        """Per loop column, its cell column as python ints, for the torch loops (one device read)."""
        if self._column_group is None:
            self._column_group = self.column_group_index.tolist()
        return self._column_group

    def finish(self, check: bool = True) -> RowsResult:
        """The run's results; ``check``: raise now if it failed (a device read), else leave it to the
        caller to read ``flags`` with its other statistics."""
        flags = torch.stack([self.has_data, self.info == 0])
        if check and (error := failure(flags.tolist(), self.damp)) is not None:
            raise error
        scale, zero = self.scaleT.T.contiguous(), self.zeroT.T.contiguous()
        deqT, codesT = self.deqT, self.codesT
        self.deqT = self.codesT = self.WT = self.U = self.err_buf = None  # freed as the results are made
        if self.perm is None:
            weight, codes = deqT.T.contiguous(), codesT.T.contiguous()
        else:  # un-permuted and transposed in one copy each: column perm[j] is row j of the loop's buffers
            weight = deqT.new_empty(deqT.shape[::-1]).index_copy_(1, self.perm, deqT.T)
            codes = codesT.new_empty(codesT.shape[::-1]).index_copy_(1, self.perm, codesT.T)
        del deqT, codesT
        qweight = QuantizedWeight(weight=weight, codes=codes, scale=scale, zero=zero.to(torch.int32), grid=self.grid)
        return RowsResult(qweight, self.err_sq, self.lam, self.dead, flags)


def _quadratic_rows(M: torch.Tensor, H: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """diag(M H M^T) in float64: each row's m H m^T, a chunk of rows at a time (products in TF32 on
    CUDA: a report statistic, see `tf32_products`)."""
    out = torch.empty(M.shape[0], dtype=torch.float64, device=M.device)
    with tf32_products(M.is_cuda):
        for start in range(0, M.shape[0], chunk_rows):
            m = M[start:start + chunk_rows]
            out[start:start + chunk_rows] = (m @ H).mul_(m).sum(dim=1, dtype=torch.float64)
    return out


def _row_square_sums(W: torch.Tensor, Q: torch.Tensor, dead: torch.Tensor, chunk_elements: int = 2**24):
    """Per row: sum_j (W - Q)_j^2 and the same over the dead columns only, squares in fp32, the
    first summed in float64, a chunk of rows at a time (a copy of a whole stacked weight would be the
    unit's largest buffer). The dead columns' share is a product with their 0/1 indicator: no device
    wait to ask whether there are any."""
    total = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
    on_dead = torch.empty_like(total)
    indicator = dead.to(torch.float32)
    chunk_rows = max(1, chunk_elements // max(1, W.shape[1]))
    for start in range(0, W.shape[0], chunk_rows):
        squares = (W[start:start + chunk_rows] - Q[start:start + chunk_rows]).square_()
        total[start:start + chunk_rows] = squares.sum(dim=1, dtype=torch.float64)
        on_dead[start:start + chunk_rows] = squares @ indicator
    return total, on_dead


def _stackable(targets, stats) -> list[list]:
    """Targets in groups that share an input (one Hessian) and a grid: GPTQ runs once per group on the
    stacked rows. A per-tensor grid has one scale per Linear, so those are never stacked."""
    by_name = {t.name: t for t in targets}
    groups = stats.groups(list(by_name)) if hasattr(stats, "groups") else [[n] for n in by_name]
    out = []
    for names in groups:
        split: dict = {}
        for name in names:
            grid = by_name[name].grid
            key = (grid, id(by_name[name])) if grid.granularity == "tensor" else (grid,)
            split.setdefault(key, []).append(by_name[name])
        out += list(split.values())
    return out


def quantize_unit(unit, stats, cfg: GPTQConfig) -> tuple[dict[str, LayerResult], list[dict]]:
    """GPTQ of a unit's Linears; Linears that read one input are quantized together (one Hessian, one
    damped Cholesky, one column loop over their stacked rows: the codes are those of one at a time),
    and the unit's groups run side by side on CUDA (`quantize_rows_concurrently`).

    The report's calibration errors need no extra pass: GPTQ's own scaled errors give
    tr(D H D^T) = sum e^2 - λ ||D||^2 - (dead inputs' ||D_j||^2), and one matrix product with H
    gives tr(W H W^T) and RTN's error for every stacked row."""
    # The widest inputs first: on CUDA each group's preparation runs on its own stream, and the widest
    # Hessian's factorisation is the longest (the order changes no code: the runs are independent).
    groups = sorted(_stackable(unit.targets, stats), key=lambda g: -g[0].module.weight.shape[1])
    users: dict[int, int] = {}  # LayerStats object -> groups still to read its Hessian
    for group in groups:
        users[id(stats[group[0].name])] = users.get(id(stats[group[0].name]), 0) + 1
    shared = {key for key, n in users.items() if n > 1}
    stacked = [[t.module.weight.detach() for t in group] for group in groups]
    before_run = SpanClock(any(t.module.weight.is_cuda for t in unit.targets))  # the RTN reference, tr(W H Wᵀ)

    def stacked_float(weights):
        return (torch.cat(weights) if len(weights) > 1 else weights[0]).float()

    # The report's quadratic forms in the undamped H, every group's before any run is prepared: on the
    # current stream, alone on the device, so their span is their cost (on the runs' streams it would
    # also count the other groups' work beside them).
    quads = []
    for group, weights in zip(groups, stacked):
        W = stacked_float(weights)
        H = stats[group[0].name].hessian.to(W.device)
        with before_run.span(), record_function("lmms_quant.gptq.report"):
            # W and its RTN error stacked: one product with H for both (half the launches on the
            # ViT's and Q-Former's small matrices, where the report's time is its kernel count)
            both = torch.cat([W, rtn_delta(W, group[0].grid)])  # (one pass for the error on CUDA, `rtn_kernel`)
            rows = _quadratic_rows(both, H, chunk_rows=8192)
            quads.append((rows[:W.shape[0]], rows[W.shape[0]:]))
        del W, H, both

    def make_job(group, weights) -> dict:
        """A group's job, made as the runs are prepared; its run takes the weight and Hessian (`_Run`),
        so no float32 weight or Hessian outlives the copies the run makes of it."""
        W = stacked_float(weights)
        layer = stats[group[0].name]
        H = layer.hessian.to(W.device)
        users[id(layer)] -= 1
        if users[id(layer)] == 0:
            layer.hessian = None  # no longer read here; an unshared one is damped in place by its run
        # A Hessian two groups read is copied by each run: their streams may read it side by side.
        return dict(weight=W, hessian=H, grid=group[0].grid, damp=cfg.damp, block_size=cfg.block_size,
                    act_order=cfg.act_order, overwrite_hessian=id(layer) not in shared)

    device = unit.targets[0].module.weight.device if unit.targets else "cpu"
    runs_clock = SpanClock(torch.device(device).type == "cuda")  # preparation and loops, on the main stream
    with runs_clock.span("runs"):
        done_all = quantize_rows_concurrently((make_job(g, w) for g, w in zip(groups, stacked)), device=device,
                                              check=False)

    # Everything below stays on the device: the errors, the checks and the spans' seconds are read with
    # the unit's other statistics (`records`), after the host has queued the next block's forwards.
    per_group = []
    for weights, (den, rtn_num), done in zip(stacked, quads, done_all):
        W = stacked_float(weights)  # the modules still hold their original weights
        after_run = SpanClock(W.is_cuda)
        with after_run.span(), record_function("lmms_quant.gptq.report"):
            squares, dead_squares = _row_square_sums(W, done.qweight.weight, done.dead)
            num = (done.err_sq - done.lam * squares - dead_squares).clamp(min=0)
            del W
            bounds, start = [], 0
            for w in weights:
                bounds.append((start, start + w.shape[0]))
                start += w.shape[0]
            # per Linear: the relative calibration error of GPTQ and of RTN, sqrt(num / den) (NaN when
            # den is 0: a Linear whose output the calibration inputs do not move)
            den_sum = torch.stack([den[a:b].sum() for a, b in bounds])
            ratios = torch.stack([torch.stack([num[a:b].sum(), rtn_num[a:b].sum()]) for a, b in bounds])
            errors = torch.where(den_sum[:, None] > 0, (ratios / den_sum[:, None]).sqrt(), float("nan"))
        per_group.append((bounds, errors, after_run))

    # the unit's phases, shared out over its Linears (the report sums them): the report's quadratic
    # forms before the runs, the runs (each group's preparation and column loop, to the last one's
    # end), and the report's sums after them
    phases = Later(lambda: {"report_before": before_run.seconds(), **runs_clock.by_name(),
                            "report_after": sum(clock.seconds() for _, _, clock in per_group)})
    n_linears = sum(len(g) for g in groups)
    share = Later(lambda: {k: v / n_linears for k, v in phases.get().items()})

    def unit_failure(flags: list[bool]) -> Exception:
        error = failure(flags, cfg.damp)
        return type(error)(f"{unit.name}: {error}")

    results = {}
    for group, done, (bounds, errors, after_run) in zip(groups, done_all, per_group):
        names = [t.name for t in group]
        # this group's share of the report's statistics: its own sums after the run, and the quadratic
        # forms before the runs shared out over the groups
        group_stats_s = Later(lambda after_run=after_run: phases.get()["report_before"] / max(1, len(groups))
                              + after_run.seconds())
        check = DeviceCheck(done.flags, unit_failure)
        for k, (t, (r0, r1)) in enumerate(zip(group, bounds)):
            q = done.qweight
            qweight = q if len(group) == 1 else QuantizedWeight(
                weight=q.weight[r0:r1].contiguous(), codes=q.codes[r0:r1].contiguous(),
                scale=q.scale[r0:r1].contiguous(), zero=q.zero[r0:r1].contiguous(), grid=q.grid)
            info = {"damp": cfg.damp, "act_order": cfg.act_order, "calib_tokens": stats[t.name].n_calib,
                    "report_stats_s": Later(lambda s=group_stats_s, n=len(group): s.get() / n),
                    "phase_s": share}
            if len(group) > 1:
                info["quantized_with"] = [n for n in names if n != t.name]
            results[t.name] = LayerResult(qweight, calib_error=errors[k, 0], rtn_calib_error=errors[k, 1],
                                          info=info, check=check)
    return results, []

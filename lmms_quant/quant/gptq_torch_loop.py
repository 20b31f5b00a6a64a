"""GPTQ's column loop over one block in torch: on fixed buffers replayed as a CUDA graph (`BlockLoop`),
or kernel by kernel (`irregular_block`). It serves on the CPU, and on CUDA where the Triton kernel
(`gptq_kernel`) cannot: triton missing, ``LMMS_QUANT_GPTQ_KERNEL=0``, or a group that spills past its
block. Same codes as `gptq_reference` bit for bit (tests; ``scripts/bench_gpu.py --check-reference``)."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def _round_column(w, r, dq, err, s, lo, hi, d, rest, u_row, product):
    """Column i of a block: r = code - zero, dequantized dq, scaled error err; spread err over the rest.

    clamp(round(w/s), -z, maxq - z) is clamp(round(w/s) + z, 0, maxq) - z exactly (small integers in
    float), so r * s is the reference's (q - z) * s bit for bit; the codes r + z are formed once per
    block. The spread is a product, then a subtraction (``product``: a buffer shaped like ``rest``),
    each rounded, as in the reference: ``addr_`` may fuse them into one multiply-add, whose single
    rounding differs (and the Triton kernel, `gptq_kernel`, has to match one fixed definition)."""
    torch.div(w, s, out=r).round_().clamp_(lo, hi)
    torch.mul(r, s, out=dq)
    torch.sub(w, dq, out=err).div_(d)
    torch.mul(u_row[:, None], err[None, :], out=product)
    rest.sub_(product)


def irregular_block(WT, U, scaleT, zeroT, deqT, codesT, i1, i2, column_group, grid, static):
    """A block whose groups spill past its end, or the last partial block: run kernel by kernel."""
    columns = WT.shape[0]
    g, maxq = grid.group_size, grid.maxq
    W1 = WT[i1:i2].clone()
    Err1 = torch.zeros_like(W1)
    product = torch.empty_like(W1)
    Q1, C1 = deqT[i1:i2], codesT[i1:i2]
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        if not static and col % g == 0:
            end = min(col + g, columns)
            current = W1[i:min(end, i2) - i1]
            if end > i2:
                # Columns past this block still lack this block's lazy update: apply it for them.
                tail = WT[i2:end] - U[i1:col, i2:end].T @ Err1[:i]
                current = torch.cat([current, tail], dim=0)
            s, z = grid.params_from_range(current.amin(dim=0), current.amax(dim=0))
            scaleT[column_group[col]], zeroT[column_group[col]] = s, z
        group = column_group[col]
        z = zeroT[group]
        r = torch.empty_like(W1[i])
        _round_column(W1[i], r, Q1[i], Err1[i], scaleT[group], -z, maxq - z, U1[i, i], W1[i + 1:], U1[i, i + 1:],
                      product[i + 1:])
        C1[i].copy_(r.add_(z))
    return Err1


class BlockLoop:
    """The column loop of one full block on fixed buffers; on CUDA a captured graph.

    Static parameters: per-column (scale, zero) rows are gathered into ``s_buf``/``z_buf`` before the
    loop. Groups: the loop fits group k (columns k*g.. of the block) into row k when it enters it, and
    the rows are copied out after. Every kernel and operand is the one the kernel-by-kernel loop uses,
    so the codes are the same (and `gptq_reference`'s: tests, and bench_gpu --check-reference)."""

    _cache: dict = {}
    _MAX_CACHED = 32
    graphs_disabled = os.environ.get("LMMS_QUANT_CUDA_GRAPHS", "1") == "0"

    def __init__(self, rows, prow, block, grid, static, device):
        self.block, self.grid, self.static = block, grid, static
        f32 = dict(device=device, dtype=torch.float32)
        self.W1 = torch.zeros(block, rows, **f32)
        self.Err1 = torch.zeros(block, rows, **f32)
        self.Q1 = torch.zeros(block, rows, **f32)
        self.C1 = torch.zeros(block, rows, **f32)
        self.P1 = torch.zeros(block, rows, **f32)  # the in-block update's products
        self.U1 = torch.eye(block, **f32)
        n_params = block if static else block // grid.group_size
        self.s_buf = torch.ones(n_params, prow, **f32)
        self.z_buf = torch.zeros(n_params, prow, **f32)
        self.lo_buf = torch.zeros(n_params, prow, **f32)  # -z and maxq - z: the range of code - z
        self.hi_buf = torch.zeros(n_params, prow, **f32)
        self.graph = None
        if torch.device(device).type == "cuda" and not BlockLoop.graphs_disabled:
            try:
                self.graph = self._capture()
            except Exception as err:  # a capture failure must not cost the result: run kernel by kernel
                log.warning("lmms-quant gptq: CUDA graph capture failed (%s); running the column loop eagerly", err)
                BlockLoop.graphs_disabled = True
                self.graph = None

    @classmethod
    def get(cls, WT, prow, block, grid, static, slot=0):
        # ``slot``: runs interleaved on separate streams never share buffers.
        key = (tuple(WT.shape), prow, block, grid, static, str(WT.device), slot)
        loop = cls._cache.get(key)
        if loop is None:
            if len(cls._cache) >= cls._MAX_CACHED:
                cls._cache.pop(next(iter(cls._cache)))
            loop = cls._cache[key] = cls(WT.shape[1], prow, block, grid, static, WT.device)
        return loop

    def _columns(self):
        g, maxq = self.grid.group_size, self.grid.maxq
        W1, Err1, Q1, C1, U1 = self.W1, self.Err1, self.Q1, self.C1, self.U1
        for i in range(self.block):
            if self.static:
                k = i
            else:
                k = i // g
                if i % g == 0:
                    current = W1[i:i + g]
                    s, z = self.grid.params_from_range(current.amin(dim=0), current.amax(dim=0))
                    self.s_buf[k].copy_(s)
                    self.z_buf[k].copy_(z)
                    torch.mul(self.z_buf[k], -1, out=self.lo_buf[k])
                    torch.add(self.lo_buf[k], maxq, out=self.hi_buf[k])
            _round_column(W1[i], C1[i], Q1[i], Err1[i], self.s_buf[k], self.lo_buf[k], self.hi_buf[k], U1[i, i],
                          W1[i + 1:], U1[i, i + 1:], self.P1[i + 1:])

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._columns()  # warm-up outside capture (lazy initialisations)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._columns()
        return graph

    def run(self, WT, U, scaleT, zeroT, deqT, codesT, i1, i2, column_group, group_index):
        self.W1.copy_(WT[i1:i2])
        self.U1.copy_(U[i1:i2, i1:i2])
        if self.static:
            index = group_index[i1:i2]
            torch.index_select(scaleT, 0, index, out=self.s_buf)
            torch.index_select(zeroT, 0, index, out=self.z_buf)
            torch.mul(self.z_buf, -1, out=self.lo_buf)
            torch.add(self.lo_buf, self.grid.maxq, out=self.hi_buf)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._columns()
        deqT[i1:i2].copy_(self.Q1)
        if self.static:
            self.C1.add_(self.z_buf)
        else:
            groups, g = self.z_buf.shape[0], self.grid.group_size
            self.C1.view(groups, g, -1).add_(self.z_buf[:, None, :])
        codesT[i1:i2].copy_(self.C1)  # integers 0..2^b-1: exact in uint8
        if not self.static:
            first = column_group[i1]
            scaleT[first:first + self.s_buf.shape[0]].copy_(self.s_buf)
            zeroT[first:first + self.z_buf.shape[0]].copy_(self.z_buf)
        return self.Err1

"""How AWQ scores a weight error D on a Linear's calibration input X: ||X Dᵀ||², the output error.

The searches score dozens of candidate errors per Linear on the same X. Where X is at least twice as
tall as wide they multiply by R (columns x columns, upper triangular) with RᵀR = XᵀX + diag(shift)
instead of X, and take the shift's share back out exactly:

    ||X Dᵀ||² = ||R Dᵀ||² - sum_(o,j) shift_j D_oj²

LLaVA's o_proj scores through 4096 rows of R, not 16384 of X; the BLIP-2 ViT's Linears through 1408
rows, not 33k. The shift is what lets the Cholesky succeed when XᵀX is singular or nearly so, as the
Gram matrix of a LayerNorm's output is when its bias is small (each token's features sum to ~0) and
its float32 rounding then makes it indefinite: without the correction, a failed factorisation meant
scoring through all of X. XᵀX is summed in float64; the shift starts at 1e-7 · max H_jj (one
Cholesky is then enough for those inputs too) and grows only if the Cholesky fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative diagonal shifts tried in turn; the largest still leaves ~4 significant digits after the
# exact correction, far finer than the loss differences between candidate scales.
SHIFTS = (1e-7, 1e-5, 1e-3)
FACTOR_SHIFTS: dict = {}  # the shift each factorisation of this process needed (None: none did), for benchmarks


def input_factor(x: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R, shift): R upper triangular (columns x columns, float32) with RᵀR = XᵀX + diag(shift). None
    when X is not at least twice as tall as wide (X itself is then the cheaper product), or when no
    shift of `SHIFTS` makes the Gram matrix factorisable (a NaN in X).

    XᵀX is summed and factored in float64."""
    rows, columns = x.shape
    if 2 * columns > rows:
        return None
    # In float64, a chunk of rows at a time. Not by tensor cores: on an H200 the fp16 (and TF32)
    # product's sum is ~1e-4 off relative to the largest diagonal (benchmarks/engine/
    # awq_input_factor_gram_h200_diag.json), which made the Gram of a LayerNorm's output indefinite
    # by up to 2e-3 of it: most factorisations then needed the largest shift or failed.
    gram = torch.zeros(columns, columns, device=x.device, dtype=torch.float64)
    for start in range(0, rows, chunk_rows):
        rows64 = x[start:start + chunk_rows].double()
        gram.addmm_(rows64.T, rows64)
    del rows64
    top = gram.diagonal().max()
    added = 0.0
    for relative in SHIFTS:
        gram.diagonal().add_((relative - added) * top)  # in place: the shift grows to `relative`
        added = relative
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            FACTOR_SHIFTS[relative] = FACTOR_SHIFTS.get(relative, 0) + 1
            # what RᵀR adds: the factored matrix's diagonal less XᵀX's, as it was rounded in float64
            return factor.T.float(), (relative * top).float().expand(columns)
    FACTOR_SHIFTS[None] = FACTOR_SHIFTS.get(None, 0) + 1
    return None


@dataclass(frozen=True)
class OutputScoring:
    """Scores ||X Dᵀ||² through ``rows``: X itself (``shift`` None) or its `input_factor` R."""

    rows: torch.Tensor
    shift: torch.Tensor | None = None  # (columns,) what RᵀR adds to XᵀX's diagonal

    @classmethod
    def of(cls, x: torch.Tensor) -> "OutputScoring":
        factor = input_factor(x)
        return cls(x) if factor is None else cls(*factor)

    def scaled(self, s: torch.Tensor) -> "OutputScoring":
        """The scoring of X diag(1/s): R diag(1/s) factors it, with shift / s²."""
        return OutputScoring(self.rows / s[None, :], None if self.shift is None else self.shift / s.square())

    def sq_error(self, delta: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """||X deltaᵀ diag(row_weight)||² (0-dim, delta's dtype, on the device)."""
        return self.sq_errors(delta[None], row_weight)[0]

    def sq_errors(self, deltas: torch.Tensor, row_weight: torch.Tensor | None = None,
                  chunk_rows: int = 4096) -> torch.Tensor:
        """||X D_kᵀ diag(row_weight)||² of each of K stacked errors (K, out, in), as (K,) in their dtype:
        one product per chunk of scoring rows for all K, not K products, so a search's candidates cost
        a few launches (the searches are launch-bound on the ViT's and Q-Former's Linears). Each
        chunk's squares are summed per candidate; K at once agree with one at a time to float32
        rounding, not bit for bit."""
        k, rows, columns = deltas.shape
        flat = deltas.reshape(k * rows, columns)
        weight2 = None if row_weight is None else row_weight.square().to(deltas.dtype)
        total = torch.zeros(k, device=deltas.device, dtype=deltas.dtype)
        for start in range(0, self.rows.shape[0], chunk_rows):
            y = (self.rows[start:start + chunk_rows].to(deltas.dtype) @ flat.T).square_().view(-1, k, rows)
            total += (y.sum(dim=0) if weight2 is None else y.sum(dim=0) * weight2).sum(dim=1)
        if self.shift is not None:  # the shift's share, a chunk of rows at a time (no weight-sized square)
            shift, per_row = self.shift.to(deltas.dtype), []
            step = max(1, chunk_rows // 2)
            for start in range(0, k * rows, step):
                per_row.append(flat[start:start + step].square() @ shift)
            share = torch.cat(per_row).view(k, rows)
            total -= (share if weight2 is None else share * weight2).sum(dim=1)
        return total

    def sq_norms(self, reference: torch.Tensor, errors: list[torch.Tensor],
                 chunk_rows: int = 2048) -> tuple[float, list[float]]:
        """||X Wᵀ||² and each ||X Eᵀ||² (E: an error W - A), one matrix at a time and a chunk of rows at
        a time: per row the squares are summed in float32 (at most a few thousand terms), the row sums in float64.
        No stack of the matrices and no float64 copy of a product: on a LLaVA-7B down_proj those made
        2 GiB, the unit's largest buffers."""
        totals = []
        for matrix in [reference, *errors]:
            total = torch.zeros((), dtype=torch.float64, device=reference.device)
            for start in range(0, self.rows.shape[0], chunk_rows):
                y = self.rows[start:start + chunk_rows].float() @ matrix.T
                total += y.square_().sum(dim=1).sum(dtype=torch.float64)
            if self.shift is not None:  # by chunks of rows too: no weight-sized square
                for start in range(0, matrix.shape[0], chunk_rows):
                    total -= (matrix[start:start + chunk_rows].square() @ self.shift).sum(dtype=torch.float64)
            totals.append(total)
        values = torch.stack(totals).tolist()  # one device read
        return values[0], values[1:]

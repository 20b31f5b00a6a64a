"""The integer grid, RTN, GPTQ and AWQ on plain tensors: levels, exact reconstruction, error ordering."""

import pytest
import torch
import torch.nn as nn

from lmms_quant.quant import awq, awq_scoring, gptq, rtn
from lmms_quant.quant.awq_scoring import OutputScoring
from lmms_quant.quant.archs import FoldSite
from lmms_quant.quant.quantizer import (QuantGrid, max_levels_per_cell, quantize_rtn, relative_hessian_error,
                                        relative_output_error)

GRIDS = [
    QuantGrid(bits=b, sym=sym, granularity=g, group_size=gs)
    for b in (2, 3, 4, 8) for sym in (False, True)
    for g, gs in (("tensor", -1), ("channel", -1), ("group", 32), ("group", 48))
]


def correlated_inputs(n_tokens=2048, n_features=128, seed=0, outliers=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_features, n_features, generator=gen) / n_features**0.5
    x = torch.randn(n_tokens, n_features, generator=gen) @ (torch.eye(n_features) + 0.8 * mixing)
    if outliers:
        x[:, :outliers] *= 20.0  # a few channels carry large activations, as in real LLMs
    return x


def weight(out_features=96, in_features=128, seed=1):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def expanded(param, grid, in_features):
    return grid.expand(param, in_features)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_rtn_codes_reproduce_the_weight_with_at_most_2_to_the_bits_levels(grid):
    w = weight()
    q = rtn.quantize_layer(w, grid)
    s, z = expanded(q.scale, grid, 128), expanded(q.zero.float(), grid, 128)
    assert torch.equal(q.weight, (q.codes.float() - z) * s)
    assert int(q.codes.max()) <= 2**grid.bits - 1
    assert q.max_levels() <= 2**grid.bits
    assert max_levels_per_cell(q.weight, grid) <= 2**grid.bits
    if grid.sym:
        assert torch.all(q.zero == 2 ** (grid.bits - 1))
    assert q.scale.shape == grid.param_shape(96, 128)


def test_rtn_hand_example():
    # A row spanning [-1, 2] at 2 bits asymmetric: scale 1, zero-point 1, every value exact.
    grid = QuantGrid(bits=2, sym=False, granularity="channel")
    w = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [0.0, 0.3, 0.6, 0.9]])
    q = quantize_rtn(w, grid)
    assert torch.allclose(q.scale[:, 0], torch.tensor([1.0, 0.3]))
    assert q.zero[:, 0].tolist() == [1, 0]
    assert torch.allclose(q.weight, w)
    # Symmetric 3 bits: s = 2 max|w| / 7 = 4/7; 0.5 -> 0.875 -> level 1 -> 4/7; 1.0 -> 1.75 -> 2 -> 8/7.
    # -2.0 is -3.5 levels: half-way between the two lowest levels (a tie, either is nearest).
    sym = quantize_rtn(torch.tensor([[0.5, 1.0, -2.0]]), QuantGrid(bits=3, sym=True, granularity="tensor"))
    assert torch.allclose(sym.scale, torch.tensor([[4 / 7]]))
    assert torch.allclose(sym.weight[0, :2], torch.tensor([4 / 7, 8 / 7]))
    assert min(abs(float(sym.weight[0, 2]) - v) for v in (-16 / 7, -12 / 7)) < 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_uses_all_2_to_the_bits_levels_like_compressed_tensors(bits):
    # compressed-tensors' calculate_qparams (symmetric int): scale = max|w| / ((q_max - q_min) / 2) with
    # q_min = -2^(b-1), q_max = 2^(b-1) - 1, zero-point 0; signed codes clamp(round(w / scale), q_min, q_max).
    w = torch.linspace(-1.0, 1.0, 4001).reshape(1, -1) * 0.3
    grid = QuantGrid(bits=bits, sym=True, granularity="channel")
    q = quantize_rtn(w, grid)
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ct_scale = w.abs().amax() / ((q_max - q_min) / 2)
    assert torch.allclose(q.scale, ct_scale.reshape(1, 1))
    signed = torch.clamp(torch.round(w / q.scale), q_min, q_max)
    assert torch.equal(q.codes.float() - 2 ** (bits - 1), signed)
    assert torch.equal(q.weight, signed * q.scale)
    assert int(q.codes.max()) <= 2**bits - 1
    assert len(torch.unique(q.codes)) == 2**bits == q.max_levels()


@pytest.mark.parametrize("bits", [3, 4])
def test_symmetric_error_is_below_the_old_2_to_the_bits_minus_1_level_grid(bits):
    w = weight()
    grid = QuantGrid(bits=bits, sym=True, granularity="group", group_size=32)
    x = correlated_inputs()
    cells = w.reshape(96, 4, 32)
    old_scale = (cells.abs().amax(dim=2, keepdim=True) / (2 ** (bits - 1) - 1))
    old = (torch.clamp(torch.round(cells / old_scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * old_scale).reshape(96, 128)
    new = quantize_rtn(w, grid).weight
    assert relative_output_error(x, w, new) < 0.97 * relative_output_error(x, w, old)


@pytest.mark.parametrize("sym", [False, True])
def test_a_narrow_last_group_takes_its_range_from_its_own_columns(sym):
    # 100 columns in groups of 32: the last group holds columns 96..99 only. Column 0 (group 0) is
    # large; the last group's values are small: its scale must not see column 0.
    w = torch.randn(256, 100, generator=torch.Generator().manual_seed(0)) * 0.01
    w[:, 0] = 1.0
    grid = QuantGrid(bits=4, sym=sym, granularity="group", group_size=32)
    q = quantize_rtn(w, grid)
    tail = w[:, 96:]
    expected = QuantGrid(bits=4, sym=sym, granularity="channel").fit(tail)[0]
    assert torch.allclose(q.scale[:, -1:], expected)
    assert float((q.weight[:, 96:] - tail).abs().max()) <= float(expected.max()) / 2 + 1e-7


def test_rtn_per_tensor_is_the_papers_uniform_min_max():
    w = weight()
    q = quantize_rtn(w, QuantGrid(bits=4, sym=False, granularity="tensor"))
    assert q.scale.numel() == 1
    assert torch.allclose(q.scale, (w.max() - w.min()).reshape(1, 1) / 15)


def test_bits_per_weight_accounting_by_hand():
    # 128 x 64 weight: 4 bits each, plus per cell an fp16 scale and (asymmetric) a 4-bit zero-point.
    channel = QuantGrid(bits=4, sym=False, granularity="channel")
    assert channel.storage_bits(128, 64) == 4 * 128 * 64 + 128 * (16 + 4)
    group = QuantGrid(bits=4, sym=True, granularity="group", group_size=32)
    assert group.storage_bits(128, 64) == 4 * 128 * 64 + 128 * 2 * 16
    ragged = QuantGrid(bits=3, sym=False, granularity="group", group_size=48)  # groups of 48 and 16
    assert ragged.storage_bits(10, 64) == 3 * 640 + 10 * 2 * (16 + 3)


def test_hessian_error_equals_the_output_error_it_stands_for():
    x, w = correlated_inputs(), weight()
    approx = rtn.quantize_layer(w, QuantGrid(bits=3, sym=False, granularity="channel")).weight
    assert relative_hessian_error(x.T @ x, w, approx) == pytest.approx(relative_output_error(x, w, approx), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity,group_size", [("channel", -1), ("group", 32), ("tensor", -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_calibration_data(bits, granularity, group_size, act_order):
    x, w = correlated_inputs(), weight()
    grid = QuantGrid(bits=bits, sym=False, granularity=granularity, group_size=group_size)
    q = gptq.quantize_layer(w, x.T @ x, grid, act_order=act_order)
    gptq_error = relative_output_error(x, w, q.weight)
    rtn_error = relative_output_error(x, w, rtn.quantize_layer(w, grid).weight)
    assert gptq_error < rtn_error
    # The stored per-group parameters reproduce the result (no re-quantization with one set of params).
    s, z = expanded(q.scale, grid, 128), expanded(q.zero.float(), grid, 128)
    assert torch.equal(q.weight, (q.codes.float() - z) * s)
    assert q.max_levels() <= 2**bits


def test_gptq_reproduces_the_reference_error_table_at_4_bits():
    # quantization notes §8: W 256x512, correlated X, g64 asym: GPTQ ~0.062 vs RTN ~0.091 at 4 bits.
    x, w = correlated_inputs(4096, 512, seed=3), weight(256, 512, seed=4)
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=64)
    g = relative_output_error(x, w, gptq.quantize_layer(w, x.T @ x, grid).weight)
    r = relative_output_error(x, w, rtn.quantize_layer(w, grid).weight)
    assert g < 0.8 * r


@pytest.mark.parametrize("block_size", [16, 48, 200])
def test_gptq_lazy_blocks_do_not_change_the_result(block_size):
    # Groups of 32 against blocks of 16 (groups span blocks), 48 (misaligned) and 200 (one block):
    # lazy batching is an exact reformulation, so only float rounding may differ.
    x, w = correlated_inputs(), weight()
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    reference = gptq.quantize_layer(w, x.T @ x, grid, block_size=128)
    lazy = gptq.quantize_layer(w, x.T @ x, grid, block_size=block_size)
    assert (lazy.codes != reference.codes).float().mean() < 0.005
    assert torch.allclose(lazy.scale, reference.scale, rtol=1e-3, atol=1e-6)


def test_gptq_dead_input_columns_are_rounded_not_zeroed():
    x, w = correlated_inputs(), weight()
    x[:, 5] = 0.0
    grid = QuantGrid(bits=4, sym=False, granularity="channel")
    q = gptq.quantize_layer(w, x.T @ x, grid)
    assert torch.count_nonzero(q.weight[:, 5]) > 0
    assert torch.allclose(q.weight[:, 5], w[:, 5], atol=float(q.scale.max()))


def test_gptq_refuses_a_layer_that_saw_no_data():
    with pytest.raises(gptq.NoCalibrationData):
        gptq.quantize_layer(weight(), torch.zeros(128, 128), QuantGrid(bits=4, sym=False, granularity="channel"))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_refuses_a_hessian_that_damping_does_not_make_positive_definite(act_order):
    # Checked when the run's results are read (no device wait while runs are prepared), never returned.
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    H = torch.eye(128)
    H[7, 7] = -50.0  # an indefinite "Hessian": λ = 0.01 mean(diag) cannot lift it
    with pytest.raises(gptq.HessianNotPositiveDefinite, match="damp=0.01"):
        gptq.quantize_layer(weight(), H, grid, act_order=act_order)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_scale_search_is_never_worse_than_rtn_and_wins_with_outlier_channels(bits):
    x, w = correlated_inputs(outliers=8), weight()
    grid = QuantGrid(bits=bits, sym=False, granularity="group", group_size=64)
    s, alpha, loss, rtn_loss = awq.search_scale(x, [w], [None], [grid], n_grid=20)
    assert loss <= rtn_loss
    assert alpha > 0 and loss < 0.9 * rtn_loss
    scaled = awq.scaled_rtn_weight(w, s, grid)
    rtn_error = relative_output_error(x, w, rtn.quantize_layer(w, grid).weight)
    assert relative_output_error(x, w, scaled) < rtn_error


def test_awq_clip_search_never_increases_the_error():
    x, w = correlated_inputs(), weight()
    w[0, 0] = 1.0  # an outlier weight: clipping its group's range helps the other weights
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    plain = rtn.quantize_layer(w, grid)
    clipped = awq.quantize_layer(w, x, grid, clip=True)
    assert relative_output_error(x, w, clipped.weight) <= relative_output_error(x, w, plain.weight)
    assert clipped.clip is not None and float(clipped.clip.min()) < 1.0


def _fold_site(prev, prev_name, linears, rows=None):
    return FoldSite(prev_name, prev, rows, tuple(linears))


def test_awq_folds_into_layernorm_rmsnorm_and_linear_rows_are_exact():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    norm, rms = nn.LayerNorm(16), nn.RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5), rms.weight.uniform_(0.5, 1.5)
    after_norm, after_rms = nn.Linear(16, 24), nn.Linear(16, 24)
    up, down = nn.Linear(16, 24), nn.Linear(24, 16)  # relu(up) -> down: exact through ReLU
    fused, proj = nn.Linear(16, 48), nn.Linear(16, 16)  # proj reads the last third of fused's rows
    modules = {"after_norm": after_norm, "after_rms": after_rms, "down": down, "proj": proj}

    def forward():
        return after_norm(norm(x)), after_rms(rms(x)), down(torch.relu(up(x))), proj(fused(x)[:, 32:])

    before = forward()
    s16, s24 = torch.rand(16) + 0.5, torch.rand(24) + 0.5
    awq.apply_fold(_fold_site(norm, "norm", ["after_norm"]), s16, modules)
    awq.apply_fold(_fold_site(rms, "rms", ["after_rms"]), s16, modules)
    awq.apply_fold(_fold_site(up, "up", ["down"]), s24, modules)
    awq.apply_fold(_fold_site(fused, "fused", ["proj"], rows=slice(32, 48)), s16, modules)
    after = forward()
    for b, a in zip(before, after):
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-5)


class _Attention(nn.Module):
    """A small multi-head attention whose output mixes q, k and v non-linearly (softmax)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h, bias=None):
        b, t, d = h.shape
        split = lambda y: y.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class _PreNormAttentionBlock(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = _Attention(d, heads)

    def forward(self, x, bias):
        return x + self.attn(self.norm(x), bias=bias)


def test_awq_picks_the_scale_by_the_attention_modules_output_not_the_linears_own_errors():
    from lmms_quant.quant.archs import LinearSite, Target, Unit, UnitSite
    from lmms_quant.quant.calibration import Batch, Calibrator

    torch.manual_seed(1)
    block = _PreNormAttentionBlock().eval()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2.0)
        block.norm.weight[:3] *= 15  # outlier channels, where AWQ's scales matter
        block.attn.q.weight.mul_(4), block.attn.k.weight.mul_(4)
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=16)
    names = ["attn.q", "attn.k", "attn.v"]
    sites = [LinearSite(n, block.get_submodule(n), f"attn.{n[-1]}", "llm", None, None, None) for n in names]
    fold = FoldSite("norm", block.norm, None, tuple(names))
    unit = Unit(UnitSite("block", "llm", None, None, None, sites, [fold]), [Target(s, grid) for s in sites],
                [fold], block)
    batches = [Batch({"x": torch.randn(4, 12, 32)}, options={"bias": torch.randn(1, 4, 12, 12)}) for _ in range(4)]
    original = {n: block.get_submodule(n).weight.detach().clone() for n in names}
    with torch.no_grad():
        normed = [block.norm(b.inputs["x"]) for b in batches]  # before the fold divides the norm
        reference = [block.attn(h, bias=b.options["bias"]) for h, b in zip(normed, batches)]
        stats = Calibrator(block, batches, [], seed=0, device="cpu", dtype=torch.float32).collect(
            unit, inputs=True, calls=awq.module_calls(unit))
        _, notes = awq.quantize_unit(unit, stats, awq.AWQConfig(clip=False))
        assert all(torch.equal(block.get_submodule(n).weight, w) for n, w in original.items())

        # The attention module's output error for every alpha of the grid, computed here directly.
        a = torch.cat([h.reshape(-1, 32) for h in normed]).abs().mean(dim=0)
        losses = []
        for k in range(20):
            s = a.pow(k / 20).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for n in names:
                block.get_submodule(n).weight.copy_(quantize_rtn(original[n] * s, grid).weight / s)
            err = sum(float((block.attn(h, bias=b.options["bias"]) - r).square().sum())
                      for h, b, r in zip(normed, batches, reference))
            losses.append(err)
        for n in names:
            block.get_submodule(n).weight.copy_(original[n])
    chosen = round(notes[0]["alpha"] * 20)
    assert notes[0]["criterion"] == "parent_output" and notes[0]["parent"] == "attn"
    assert chosen == min(range(20), key=losses.__getitem__)
    assert losses[chosen] <= losses[0]  # never worse than plain RTN on the block output
    # The Linears' own errors prefer another scale here, a worse one for the attention output.
    x = stats["attn.q"].inputs
    _, own_alpha, _, _ = awq.search_scale(x, list(original.values()), [None] * 3, [grid] * 3, 20)
    assert losses[round(own_alpha * 20)] > 1.1 * losses[chosen]


@pytest.mark.parametrize("columns", [128, 100])
def test_awq_cell_errors_from_group_gram_matrices_are_each_cells_own_output_error(columns):
    # Cell (o, g)'s error is ||X_g d_og||² over the tokens; the clip search forms it as d (X_gᵀX_g) dᵀ.
    # Checked cell by cell against the direct products, a narrow last group (100 = 3 x 32 + 4) and
    # output-row weights included.
    x = correlated_inputs(n_tokens=512)[:, :columns].double()
    delta = weight(24, columns, seed=4).double() * 0.1
    row_weight = torch.linspace(0.5, 2.0, 24, dtype=torch.float64)
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    got = awq._cell_sq_errors(x, delta, grid, row_weight)
    assert got.shape == grid.param_shape(24, columns)
    for g in range(got.shape[1]):
        cols = slice(32 * g, min(32 * (g + 1), columns))
        direct = (x[:, cols] @ delta[:, cols].T).square().sum(dim=0) * row_weight.square()
        assert torch.allclose(got[:, g], direct, rtol=1e-10)


def test_awq_clip_search_draws_its_rows_from_every_calibration_batch():
    # Inputs in batch order: the first batches carry no signal. A search that reads only the first
    # rows sees no error anywhere and keeps the full range; one that spreads over all rows clips.
    x = correlated_inputs(n_tokens=8192)
    x[:6144] = 0.0
    w = weight()
    w[0, 0] = 1.0
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    assert float(awq.clip_search(w, x, grid).min()) < 1.0
    assert awq.spread_rows(x, 2048).shape[0] == 2048


@pytest.mark.parametrize("grid,act_order", [
    (QuantGrid(bits=3, sym=False, granularity="group", group_size=32), False),
    (QuantGrid(bits=4, sym=True, granularity="channel"), False),
    (QuantGrid(bits=4, sym=False, granularity="group", group_size=48), True),
], ids=str)
def test_gptq_of_stacked_rows_gives_each_linear_its_own_codes(grid, act_order):
    # q/k/v read one input, so one H: their rows stacked go through one Cholesky and one column loop.
    x = correlated_inputs(outliers=4)
    H = x.T @ x
    weights = [weight(96, 128, seed=s) for s in (1, 2, 3)]
    stacked = gptq.quantize_rows(torch.cat(weights), H, grid, act_order=act_order).qweight
    for k, w in enumerate(weights):
        alone = gptq.quantize_layer(w, H, grid, act_order=act_order)
        rows = slice(96 * k, 96 * (k + 1))
        assert torch.equal(stacked.codes[rows], alone.codes) and torch.equal(stacked.weight[rows], alone.weight)
        assert torch.equal(stacked.scale[rows], alone.scale) and torch.equal(stacked.zero[rows], alone.zero)


def test_gptqs_own_errors_give_the_hessian_error_without_another_product():
    x, w = correlated_inputs(), weight()
    x[:, 7] = 0.0  # a dead input: H_jj := 1 in the factorised matrix, not in the error
    H = x.T @ x
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    done = gptq.quantize_rows(w, H, grid, act_order=True)
    delta = (w - done.qweight.weight).double()
    num = float(done.err_sq.sum() - done.lam * delta.square().sum() - delta[:, done.dead].square().sum())
    den = float(((w @ H) * w).sum())
    assert (num / den) ** 0.5 == pytest.approx(relative_hessian_error(H, w, done.qweight.weight), rel=1e-4)
    assert (num / den) ** 0.5 == pytest.approx(relative_output_error(x, w, done.qweight.weight), rel=1e-3)


@pytest.mark.parametrize("grid", [QuantGrid(bits=3, sym=False, granularity="group", group_size=32),
                                  QuantGrid(bits=4, sym=True, granularity="group", group_size=32),
                                  QuantGrid(bits=4, sym=False, granularity="group", group_size=48)], ids=str)
def test_rounding_whole_groups_on_the_group_view_gives_the_bits_of_the_expanded_parameters(grid):
    # _round broadcasts a group's parameters over its columns instead of expanding them to the
    # weight's shape; the values must be the same bits (96 columns: 48 divides them, a view; 32 too).
    from lmms_quant.quant.quantizer import _round, rtn_weight

    w = weight(40, 96, seed=6)
    scale, zero = grid.fit(w)
    s, z = grid.expand(scale, 96), grid.expand(zero, 96)
    codes = grid.quantize(w, s, z)
    expected = grid.dequantize(codes, s, z)
    got_codes, got = _round(w, grid, scale, zero)
    assert torch.equal(got_codes, codes) and torch.equal(got, expected)
    assert torch.equal(rtn_weight(w, grid), expected)
    assert torch.equal(quantize_rtn(w, grid).codes, codes.to(torch.uint8))


def _direct_sq_error(x, delta, r=None):
    y = x.double() @ delta.double().T
    return float((y if r is None else y * r.double()[None, :]).square().sum())


def test_awq_scores_through_the_input_factor_as_through_the_input_itself():
    # ||X Dᵀ|| = ||R Dᵀ|| for RᵀR = XᵀX: the Linear-output search may multiply by the small R. A dead
    # input channel (a zero column: XᵀX singular) is covered by the diagonal shift.
    x = correlated_inputs(n_tokens=1024, outliers=3)
    x[:, 5] = 0.0
    scoring = OutputScoring.of(x)
    R = scoring.rows
    assert R.shape == (128, 128) and torch.equal(R, R.triu())
    delta = weight(48, 128, seed=8) * 0.01
    row_weight = torch.linspace(0.5, 2.0, 48)
    s = torch.linspace(0.5, 3.0, 128)
    for r in (None, row_weight):
        assert float(scoring.sq_error(delta, r)) == pytest.approx(_direct_sq_error(x, delta, r), rel=1e-5)
        # R / s scores X / s (the clip and final errors of a scaled Linear)
        assert float(scoring.scaled(s).sq_error(delta, r)) == pytest.approx(_direct_sq_error(x / s, delta, r), rel=1e-5)
    assert awq_scoring.input_factor(x[:200]) is None  # not twice as tall as wide: X itself is cheaper
    assert OutputScoring.of(x[:200]).rows is not None and OutputScoring.of(x[:200]).shift is None


@pytest.mark.parametrize("inputs", ["layer_norm_without_bias", "near_duplicate_columns"])
def test_awq_scores_a_nearly_singular_input_through_its_factor_exactly(inputs):
    # A LayerNorm's output without bias sums to ~0 over the features of every token: XᵀX is singular
    # but for rounding, and in float32 the smallest shift may not make it factorisable (near-duplicate
    # columns: it never does). A larger shift does, and its share is taken back out: the errors are
    # X's own, not a ridge's.
    g = torch.Generator().manual_seed(0)
    if inputs == "layer_norm_without_bias":
        x = torch.nn.functional.layer_norm(torch.randn(4096, 128, generator=g) * 3 + 1, (128,))
    else:
        a, b = torch.randn(2048, 64, generator=g), torch.randn(2048, 64, generator=g)
        x = torch.cat([a, a + 1e-5 * b], dim=1)
    scoring = OutputScoring.of(x)
    top = float((x.double().T @ x.double()).diagonal().max())
    assert scoring.rows.shape == (128, 128)  # the factor, not the 2048+ rows of X
    # XᵀX summed in float64: the first, smallest shift is enough even here (summed in float32 it was not)
    assert float(scoring.shift[0]) == pytest.approx(awq_scoring.SHIFTS[0] * top, rel=1e-6)
    delta = torch.randn(32, 128, generator=g) * 0.01
    row_weight = torch.linspace(0.5, 2.0, 32)
    for r in (None, row_weight):
        assert float(scoring.sq_error(delta, r)) == pytest.approx(_direct_sq_error(x, delta, r), rel=1e-4)
    norm, (err,) = scoring.sq_norms(delta * 100, [delta])
    assert norm == pytest.approx(_direct_sq_error(x, delta * 100), rel=1e-4)
    assert err == pytest.approx(_direct_sq_error(x, delta), rel=1e-4)


def test_awq_scale_search_by_the_input_factor_picks_the_scale_the_input_picks(monkeypatch):
    x = correlated_inputs(n_tokens=2048, outliers=4)
    weights = [weight(64, 128, seed=s) for s in (2, 3)]
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    by_factor = awq.search_scale(x, weights, [None, None], [grid, grid], 20)
    monkeypatch.setattr(awq_scoring, "input_factor", lambda x: None)
    by_input = awq.search_scale(x, weights, [None, None], [grid, grid], 20)
    assert by_factor[1] == by_input[1] and by_factor[1] > 0
    assert by_factor[2] == pytest.approx(by_input[2], rel=1e-4)


def test_awq_report_norms_are_the_direct_output_norms_chunk_by_chunk():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(150, 24, generator=g), torch.randn(10, 24, generator=g)
    approxes = [w + 0.01 * torch.randn(10, 24, generator=g), w.round()]
    norm, errors = OutputScoring(x).sq_norms(w, [w - a for a in approxes], chunk_rows=64)  # 3 chunks, a short one
    X, W = x.double(), w.double()
    assert norm == pytest.approx(float((X @ W.T).square().sum()), rel=1e-6)
    for a, err in zip(approxes, errors):
        assert err == pytest.approx(float((X @ (W - a.double()).T).square().sum()), rel=1e-5)


@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_awq_candidates_rounded_in_batches_are_the_one_at_a_time_weights_bit_for_bit(granularity, monkeypatch):
    w = weight(24, 96, seed=11)
    grid = QuantGrid(bits=3, sym=False, granularity=granularity, group_size=32 if granularity == "group" else -1)
    mean_abs = correlated_inputs(n_tokens=256, outliers=2)[:, :96].abs().mean(dim=0)
    scales = awq.candidate_scales(mean_abs, 20)
    monkeypatch.setattr(awq, "CANDIDATE_ELEMENTS", 7 * w.numel())  # batches of 7: 7, 7 and a last one of 6
    batches = list(awq.candidate_deltas(w, scales, grid))
    assert [len(ks) for ks, _ in batches] == ([7, 7, 6] if granularity != "tensor" else [1] * 20)
    for ks, deltas in batches:
        for k, delta in zip(ks, deltas):
            assert torch.equal(delta, w - awq.scaled_rtn_weight(w, scales[k], grid))


def test_awq_parent_search_retries_a_failed_capture_then_remembers_which_kernels_captured(monkeypatch):
    # The CUDA-graph path cannot run here; its control flow can: a failed capture is retried with the
    # other attention kernels (and its own reference), the scores are those of the eager search, the
    # weights are put back, and the next search of that class starts from the kernels that captured.
    from lmms_quant.quant import awq_parent
    from lmms_quant.quant.calib_data import TokenMasks
    from lmms_quant.quant.calibration import ModuleCall

    torch.manual_seed(0)
    parent = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    calls = [ModuleCall.record((torch.randn(4, 5, 16),), {}, TokenMasks()) for _ in range(3)]
    original = parent[0].weight.detach().clone()
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=8)
    mean_abs = torch.cat([c.args[0] for c in calls]).reshape(-1, 16).abs().mean(dim=0)

    def search(stream):
        current = {"0": parent[0].weight.detach().float().clone()}
        return awq_parent._search(parent, calls, mean_abs, ["0"], {"0": parent[0]}, current, [grid], 20, None, stream)

    eager = search(None)
    attempts = []

    def fake_capture(parent_, calls_, reference, mask_key, device, key):
        attempts.append(key)
        if key.endswith("model's"):
            awq_parent.CAPTURE_FAILURES[key] = "RuntimeError: cannot capture"
            return None
        return lambda: awq_parent._squared_error(parent_, calls_, reference, mask_key, device)

    monkeypatch.setattr(awq_parent, "_capture", fake_capture)
    monkeypatch.setattr(awq_parent, "CAPTURE_FAILURES", {})
    graphed = search("a side stream")
    assert attempts == ["Sequential / model's", "Sequential / sdpa_without_cudnn"]
    assert graphed[1] == eager[1] and graphed[4] == pytest.approx(eager[4], rel=1e-6)
    assert torch.equal(parent[0].weight, original)
    attempts.clear()
    search("a side stream")
    assert attempts == ["Sequential / sdpa_without_cudnn"]


@pytest.mark.parametrize("granularity,group_size", [("group", 32), ("group", 24), ("channel", -1), ("tensor", -1)])
def test_levels_of_uint8_codes_by_scatter_are_the_sorted_count(granularity, group_size):
    # The report counts each cell's distinct codes (the ≤ 2^b property) by one scatter for uint8 codes;
    # the same count as sorting the cell, narrow last group (24 not dividing 100) included.
    from lmms_quant.quant.quantizer import max_levels_tensor

    grid = QuantGrid(bits=8, sym=False, granularity=granularity, group_size=group_size)
    g = torch.Generator().manual_seed(5)
    for high in (3, 17, 256):
        codes = torch.randint(0, high, (40, 100), generator=g, dtype=torch.uint8)
        codes[3, :] = 0  # a row of one code
        by_scatter = int(max_levels_tensor(codes, grid))
        by_sort = int(max_levels_tensor(codes.float(), grid))
        assert by_scatter == by_sort and 1 <= by_scatter <= high


@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_awq_clip_search_in_batches_picks_the_one_at_a_time_shrinks(granularity, monkeypatch):
    x = correlated_inputs(n_tokens=512, outliers=3)[:, :96]
    w = weight(20, 96, seed=4)
    grid = QuantGrid(bits=3, sym=False, granularity=granularity, group_size=32 if granularity == "group" else -1)
    row_weight = torch.linspace(0.5, 2.0, 20)
    picked = {}
    for per_batch in (1, 4, 10):  # 10 shrinks: one at a time, batches of 4, 4 and 2, all at once
        monkeypatch.setattr(awq, "CANDIDATE_ELEMENTS", per_batch * w.numel())
        picked[per_batch] = awq.clip_search(w, x, grid, row_weight)
    assert torch.equal(picked[1], picked[4]) and torch.equal(picked[1], picked[10])
    assert picked[1].unique().numel() > 1  # the search chose different shrinks for different cells


def test_awq_batched_candidate_errors_are_the_single_errors():
    from lmms_quant.quant.awq_scoring import OutputScoring

    g = torch.Generator().manual_seed(8)
    x = torch.randn(600, 48, generator=g)
    deltas = 0.01 * torch.randn(5, 16, 48, generator=g)
    row_weight = torch.linspace(0.5, 2.0, 16)
    for scoring in (OutputScoring(x), OutputScoring.of(x)):  # through X, and through its factor (with a shift)
        for r in (None, row_weight):
            batched = scoring.sq_errors(deltas, r, chunk_rows=32)
            single = torch.stack([scoring.sq_error(d, r) for d in deltas])
            assert torch.allclose(batched, single, rtol=1e-5, atol=0)
    assert OutputScoring.of(x).shift is not None

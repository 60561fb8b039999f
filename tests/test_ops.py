"""Tests for the numerical core in ``peft_sparse.ops``.

Every op is checked against a brute-force float64 ground truth built here, not against the package's own reference,
so the tests judge the reference too. Tolerances are element-wise error bounds of the form
``c * eps(dtype) * (sum of |terms|)``: tight enough that a wrong index, a missing delta or a transposed layout fails by
orders of magnitude, loose enough for legitimate rounding in the dtype under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_sparse import ops
from peft_sparse.ops import reference
from peft_sparse.ops import scatter_add, sddmm_gather, sparse_linear
from peft_sparse.ops._backend import BACKENDS, FORCE_REFERENCE_ENV

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _unique_sorted_indices(numel: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(dtype)


def _brute_force_delta(shape, indices: torch.Tensor, values: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Dense float64 delta built one entry at a time (``absolute`` sums ``|values|`` instead)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    for position, value in zip(indices.tolist(), values.double().tolist()):
        flat[position] += abs(value) if absolute else value
    return flat.view(shape)


def _indices_transposed(indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Map flat positions in an (out, in) matrix to the flat positions of the same entries in its transpose."""
    rows, cols = indices.long() // in_features, indices.long() % in_features
    return cols * out_features + rows


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Assert ``|actual - expected| <= bound`` element-wise (all compared in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs()
    bound = bound.double().expand_as(error)
    bad = error > bound
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {error.numel()} elements out of tolerance; first at {first}: "
            f"got {actual.double()[first].item()!r}, expected {expected.double()[first].item()!r}, "
            f"bound {bound[first].item()!r}; max error {error.max().item()!r}"
        )


def _rounding_bound(absolute: torch.Tensor, dtype: torch.dtype, num_terms: int) -> torch.Tensor:
    """Bound for a sum of ``num_terms`` products whose absolute sum is ``absolute``, accumulated in fp32 (or
    float64) with its inputs/output rounded to ``dtype``."""
    acc_eps = torch.finfo(torch.float64).eps if dtype == torch.float64 else EPS32
    tiny = torch.finfo(dtype).tiny
    return (3 * torch.finfo(dtype).eps + (num_terms + 2) * acc_eps) * absolute + tiny


# ----------------------------------------------------------------------------------------------------------------
# scatter_add
# ----------------------------------------------------------------------------------------------------------------

SCATTER_SHAPES = [(1, 17), (19, 1), (7, 13), (33, 65), (8, 16)]


def _check_scatter(dense_before: torch.Tensor, dense_after: torch.Tensor, indices, values) -> None:
    """Compare ``dense_after`` with ``dense_before + delta`` computed in float64 (then judged in the dense dtype)."""
    dtype = dense_after.dtype
    shape = tuple(dense_after.shape)
    delta = _brute_force_delta(shape, indices, values)
    # Each duplicate is one more rounding in `dtype` (accumulation) plus the cast of the value itself.
    counts = torch.bincount(indices.long(), minlength=shape[0] * shape[1]).view(shape).double()
    absolute = dense_before.double().abs() + _brute_force_delta(shape, indices, values, absolute=True)
    bound = (counts + 1) * torch.finfo(dtype).eps * absolute + torch.finfo(dtype).tiny
    expected = dense_before.double() + delta
    _assert_within(dense_after, expected, bound, f"scatter_add[{dtype}]")
    # Entries that no index touches must be bit-for-bit unchanged.
    untouched = counts == 0
    assert torch.equal(dense_after[untouched], dense_before[untouched])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SCATTER_SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_scatter_add_matches_brute_force(seed, shape, density, dtype, index_dtype):
    gen = _generator(seed)
    numel = shape[0] * shape[1]
    k = round(density * numel)
    dense = _randn(shape, gen, dtype)
    indices = _unique_sorted_indices(numel, k, gen, index_dtype)
    values = _randn(k, gen)  # fp32 values merged into a (possibly) lower-precision weight, as in training
    before = dense.clone()

    result = scatter_add(dense, indices, values)

    assert result is dense
    assert result.dtype == dtype and result.shape == shape
    _check_scatter(before, dense, indices, values)
    if dtype == torch.float32:
        # fp32 + fp32 with unique indices is a single correctly rounded add per entry: the answer is exact.
        expected = (before.double() + _brute_force_delta(shape, indices, values)).to(torch.float32)
        assert torch.equal(dense, expected)
    if k == 0:
        assert torch.equal(dense, before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_add_full_density_unsorted_indices(dtype):
    gen = _generator(5)
    shape = (9, 11)
    dense = _randn(shape, gen, dtype)
    indices = torch.randperm(99, generator=gen)  # every position exactly once, in random order
    values = _randn(99, gen)
    before = dense.clone()
    scatter_add(dense, indices, values)
    _check_scatter(before, dense, indices, values)


def test_scatter_add_duplicates_accumulate_exactly():
    dense = torch.zeros(2, 3)
    scatter_add(dense, torch.tensor([4, 4, 4, 0], dtype=torch.int32), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert torch.equal(dense, torch.tensor([[5.0, 0.0, 0.0], [0.0, 6.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_scatter_add_random_duplicates(seed, dtype, index_dtype):
    gen = _generator(seed)
    shape = (5, 6)
    dense = _randn(shape, gen, dtype)
    indices = torch.randint(0, 30, (120,), generator=gen).to(index_dtype)  # ~4 hits per position
    values = _randn(120, gen)
    before = dense.clone()
    scatter_add(dense, indices, values)
    assert torch.bincount(indices.long()).max() > 1
    _check_scatter(before, dense, indices, values)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 65), (1, 9), (9, 1)])
def test_scatter_add_through_transposed_view(seed, dtype, shape):
    """GPT-2 Conv1D stores its weight (in, out); the logical (out, in) weight is a transposed view of it."""
    gen = _generator(seed)
    out_features, in_features = shape
    storage = _randn((in_features, out_features), gen, dtype)
    storage_ptr = storage.data_ptr()
    logical = storage.t()
    assert not logical.is_contiguous() or 1 in shape
    numel = out_features * in_features
    k = max(1, numel // 3)
    indices = _unique_sorted_indices(numel, k, gen, torch.int64)
    values = _randn(k, gen)
    before = logical.clone()

    result = scatter_add(logical, indices, values)

    assert result is logical
    assert storage.data_ptr() == storage_ptr
    # Judge the (in, out) storage itself: the write must have gone through the view into it.
    _check_scatter(before.t(), storage, _indices_transposed(indices, out_features, in_features), values)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_add_through_column_slice_leaves_rest_alone(dtype):
    gen = _generator(3)
    big = _randn((6, 20), gen, dtype)
    big_before = big.clone()
    window = big[:, 4:11]  # (6, 7), row stride 20
    assert not window.is_contiguous()
    indices = _unique_sorted_indices(42, 20, gen, torch.int32)
    values = _randn(20, gen)
    window_before = window.clone()
    scatter_add(window, indices, values)
    _check_scatter(window_before, big[:, 4:11], indices, values)
    assert torch.equal(big[:, :4], big_before[:, :4])
    assert torch.equal(big[:, 11:], big_before[:, 11:])


def test_scatter_add_float64_values_into_float32_dense_are_cast():
    dense = torch.zeros(1, 2)
    scatter_add(dense, torch.tensor([1]), torch.tensor([1.0 + 2.0**-40], dtype=torch.float64))
    assert dense.dtype == torch.float32
    assert dense[0, 1].item() == 1.0


@pytest.mark.parametrize(
    "dense_shape,indices,values",
    [
        ((2, 3, 4), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])),  # 3-D dense
        ((6,), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])),  # 1-D dense
        ((2, 3), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0])),  # mismatched lengths
        ((2, 3), torch.tensor([0]), torch.tensor([1.0, 2.0])),  # mismatched lengths, the other way
        ((2, 3), torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]])),  # 2-D indices/values
    ],
)
def test_scatter_add_rejects_bad_input(dense_shape, indices, values):
    dense = torch.zeros(dense_shape)
    with pytest.raises(ValueError):
        scatter_add(dense, indices, values)
    assert torch.equal(dense, torch.zeros(dense_shape))  # nothing half-applied


# ----------------------------------------------------------------------------------------------------------------
# sddmm_gather
# ----------------------------------------------------------------------------------------------------------------


def _gather_expected(grad_output, input, indices):
    """(grad_output^T @ input).view(-1)[indices] in float64, plus the matching sum of |products|."""
    dense = grad_output.double().t() @ input.double()
    absolute = grad_output.double().abs().t() @ input.double().abs()
    flat = indices.long()
    return dense.reshape(-1)[flat], absolute.reshape(-1)[flat]


def _check_gather(result, grad_output, input, indices):
    expected, absolute = _gather_expected(grad_output, input, indices)
    # Inputs are upcast exactly; only fp32 accumulation over the N tokens rounds.
    bound = (grad_output.shape[0] + 2) * EPS32 * absolute + torch.finfo(torch.float32).tiny
    _assert_within(result, expected, bound, "sddmm_gather")


def _gather_indices(kind: str, numel: int, gen: torch.Generator, index_dtype) -> torch.Tensor:
    if kind == "sorted_unique":
        return _unique_sorted_indices(numel, max(1, numel // 3), gen, index_dtype)
    if kind == "full":
        return torch.arange(numel, dtype=index_dtype)
    if kind == "unsorted_duplicates":
        return torch.randint(0, numel, (2 * numel,), generator=gen).to(index_dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_tokens,out_features,in_features", [(1, 7, 13), (5, 1, 9), (17, 33, 65), (4, 9, 1)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("kind", ["sorted_unique", "full", "unsorted_duplicates"])
def test_sddmm_gather_matches_dense_product(seed, num_tokens, out_features, in_features, dtype, index_dtype, kind):
    gen = _generator(seed)
    grad_output = _randn((num_tokens, out_features), gen, dtype)
    input = _randn((num_tokens, in_features), gen, dtype)
    indices = _gather_indices(kind, out_features * in_features, gen, index_dtype)

    result = sddmm_gather(grad_output, input, indices, in_features)

    assert result.dtype == torch.float32
    assert result.shape == (indices.numel(),)
    _check_gather(result, grad_output, input, indices)


def test_sddmm_gather_float64_stays_float64():
    gen = _generator(0)
    grad_output = _randn((6, 5), gen, torch.float64)
    input = _randn((6, 4), gen, torch.float64)
    indices = torch.tensor([0, 3, 7, 19], dtype=torch.int32)
    result = sddmm_gather(grad_output, input, indices, 4)
    assert result.dtype == torch.float64
    expected, _ = _gather_expected(grad_output, input, indices)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sddmm_gather_empty_indices(dtype, index_dtype):
    gen = _generator(0)
    result = sddmm_gather(_randn((3, 4), gen, dtype), _randn((3, 5), gen, dtype), torch.empty(0, dtype=index_dtype), 5)
    assert result.shape == (0,)
    assert result.dtype == torch.float32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sddmm_gather_zero_tokens_gives_zeros(dtype):
    result = sddmm_gather(torch.empty(0, 4, dtype=dtype), torch.empty(0, 5, dtype=dtype), torch.tensor([0, 7, 19]), 5)
    assert torch.equal(result, torch.zeros(3))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sddmm_gather_non_contiguous_inputs(seed, dtype):
    gen = _generator(seed)
    num_tokens, out_features, in_features = 11, 7, 13
    grad_output = _randn((out_features, num_tokens), gen, dtype).t()  # transposed view
    input = _randn((num_tokens, 2 * in_features + 3), gen, dtype)[:, 1 : 1 + 2 * in_features : 2]  # strided slice
    assert not grad_output.is_contiguous() and not input.is_contiguous()
    assert input.shape == (num_tokens, in_features)
    indices = _unique_sorted_indices(out_features * in_features, 40, gen, torch.int32)

    result = sddmm_gather(grad_output, input, indices, in_features)

    _check_gather(result, grad_output, input, indices)
    contiguous_result = sddmm_gather(grad_output.contiguous(), input.contiguous(), indices, in_features)
    torch.testing.assert_close(result, contiguous_result, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 3, 10])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_kind", ["sorted_unique", "unsorted_duplicates"])
def test_sddmm_gather_tiling_path(monkeypatch, num_tokens, dtype, index_kind):
    """A tiny tile budget forces many tiles (and a tile of one entry when N exceeds the budget)."""
    gen = _generator(num_tokens)
    out_features, in_features = 9, 14
    grad_output = _randn((num_tokens, out_features), gen, dtype)
    input = _randn((num_tokens, in_features), gen, dtype)
    indices = _gather_indices(index_kind, out_features * in_features, gen, torch.int64)
    untiled = reference.sddmm_gather(grad_output, input, indices, in_features)

    monkeypatch.setattr(reference, "_GATHER_TILE_ELEMENTS", 7)
    tiled = reference.sddmm_gather(grad_output, input, indices, in_features)

    assert indices.numel() > 7  # genuinely more than one tile
    assert tiled.dtype == torch.float32
    _check_gather(tiled, grad_output, input, indices)
    torch.testing.assert_close(tiled, untiled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "grad_shape,input_shape,in_features",
    [
        ((4,), (4, 5), 5),  # 1-D grad_output
        ((4, 3), (4, 5, 1), 5),  # 3-D input
        ((2, 3, 3), (4, 5), 5),  # 3-D grad_output
        ((4, 3), (5, 5), 5),  # token counts differ
        ((4, 3), (4, 5), 6),  # in_features disagrees with input
    ],
)
def test_sddmm_gather_rejects_bad_shapes(grad_shape, input_shape, in_features):
    with pytest.raises(ValueError):
        sddmm_gather(torch.zeros(grad_shape), torch.zeros(input_shape), torch.tensor([0, 1]), in_features)


# Positions beyond int32 range, where 32-bit index arithmetic would overflow or truncate.
LARGE_POSITIONS = [2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**33 + 5]


@pytest.mark.parametrize("in_features", [65536, 46341, 1, 3])
def test_split_indices_near_int32_boundary(in_features):
    positions = torch.tensor(LARGE_POSITIONS, dtype=torch.int64)
    rows, cols = reference.split_indices(positions, in_features)
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    for position, row, col in zip(LARGE_POSITIONS, rows.tolist(), cols.tolist()):
        assert (row, col) == divmod(position, in_features)


@pytest.mark.parametrize("in_features", [65536, 46341])
def test_split_indices_int32_input_at_its_maximum(in_features):
    positions = torch.tensor([0, 2**31 - 2, 2**31 - 1], dtype=torch.int32)
    rows, cols = reference.split_indices(positions, in_features)
    assert rows.dtype == torch.int64
    assert [(r, c) for r, c in zip(rows.tolist(), cols.tolist())] == [
        divmod(p, in_features) for p in (0, 2**31 - 2, 2**31 - 1)
    ]


@pytest.mark.parametrize("in_features", [65536, 46341])
def test_sddmm_gather_int64_positions_beyond_int32(in_features):
    """A logical weight with > 2**31 entries, made cheap by using two tokens: only (N, out) and (N, in) exist."""
    gen = _generator(7)
    positions = LARGE_POSITIONS + [5, in_features + 3]
    out_features = max(positions) // in_features + 2
    grad_output = _randn((2, out_features), gen)
    input = _randn((2, in_features), gen)
    indices = torch.tensor(positions, dtype=torch.int64)

    result = sddmm_gather(grad_output, input, indices, in_features)

    expected = []
    for position in positions:
        row, col = divmod(position, in_features)
        expected.append(sum(grad_output[n, row].double() * input[n, col].double() for n in range(2)).item())
    torch.testing.assert_close(result.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# sparse_linear
# ----------------------------------------------------------------------------------------------------------------


def _dense_reference(x, weight, bias, indices, values, fan_in_fan_out, grad_output, weight_requires_grad):
    """Plain autograd in float64 on F.linear(x, W0 + delta, bias). Returns (y, grads dict, |.|-bounds dict)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_(weight_requires_grad)
    v64 = values.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    logical = w64.t() if fan_in_fan_out else w64
    out_features, in_features = logical.shape
    delta = (
        torch.zeros(out_features * in_features, dtype=torch.float64)
        .index_add(0, indices.long(), v64)
        .view(out_features, in_features)
    )
    merged = logical + delta
    y = F.linear(x64, merged, b64)
    y.backward(grad_output.double())

    g2 = grad_output.double().reshape(-1, out_features).abs()
    x2 = x64.detach().reshape(-1, in_features).abs()
    # |W0| + |delta| rather than |W0 + delta|: in a low-precision compute dtype both terms are rounded before they
    # are added, so a cancelling sum is only as accurate as its larger term.
    delta_abs = (
        torch.zeros(out_features * in_features, dtype=torch.float64)
        .index_add(0, indices.long(), v64.detach().abs())
        .view(out_features, in_features)
    )
    merged_abs = logical.detach().abs() + delta_abs
    y_abs = x2 @ merged_abs.t() + (0 if b64 is None else b64.detach().abs())
    weight_abs = g2.t() @ x2
    bounds_abs = {
        "y": y_abs.reshape(y.shape),
        "x": (g2 @ merged_abs).reshape(x.shape),
        "values": weight_abs.reshape(-1)[indices.long()],
        "weight": weight_abs.t() if fan_in_fan_out else weight_abs,
        "bias": g2.sum(0),
    }
    grads = {"x": x64.grad, "values": v64.grad, "weight": w64.grad, "bias": None if b64 is None else b64.grad}
    return y.detach(), grads, bounds_abs


def _make_layer_inputs(
    seed,
    x_shape,
    out_features,
    density,
    dtype,
    bias_mode,
    fan_in_fan_out,
    index_dtype,
    weight_requires_grad,
    values_dtype=torch.float32,
):
    gen = _generator(seed)
    in_features = x_shape[-1]
    logical = _randn((out_features, in_features), gen)
    weight = (logical.t().contiguous() if fan_in_fan_out else logical).to(dtype).requires_grad_(weight_requires_grad)
    bias = None if bias_mode == "none" else _randn(out_features, gen, dtype).requires_grad_(bias_mode == "trainable")
    numel = out_features * in_features
    k = round(density * numel)
    indices = _unique_sorted_indices(numel, k, gen, index_dtype)
    values = _randn(k, gen, values_dtype).requires_grad_()
    x = _randn(x_shape, gen, dtype).requires_grad_()
    grad_output = _randn(tuple(x_shape[:-1]) + (out_features,), gen, dtype)
    return x, weight, bias, indices, values, grad_output


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("x_shape", [(5, 13), (2, 3, 13), (1, 13)])
@pytest.mark.parametrize("out_features", [7, 1])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias_mode", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_matches_dense_autograd(seed, x_shape, out_features, density, bias_mode, fan_in_fan_out, dtype):
    index_dtype = INDEX_DTYPES[seed % 2]
    weight_requires_grad = seed == 1 and density == 0.3  # the unfrozen-base branch, on a subset of cases
    x, weight, bias, indices, values, grad_output = _make_layer_inputs(
        seed, x_shape, out_features, density, dtype, bias_mode, fan_in_fan_out, index_dtype, weight_requires_grad
    )
    weight_before = weight.detach().clone()
    num_tokens = grad_output.numel() // out_features
    in_features = x_shape[-1]

    y = sparse_linear(x, weight, bias, indices, values, fan_in_fan_out)
    y.backward(grad_output)

    y_ref, grads_ref, abs_ref = _dense_reference(
        x, weight, bias, indices, values, fan_in_fan_out, grad_output, weight_requires_grad
    )
    assert y.dtype == dtype and y.shape == tuple(x_shape[:-1]) + (out_features,)
    _assert_within(y, y_ref, _rounding_bound(abs_ref["y"], dtype, in_features), "output")

    assert x.grad is not None and x.grad.dtype == dtype
    _assert_within(x.grad, grads_ref["x"], _rounding_bound(abs_ref["x"], dtype, out_features), "grad x")

    assert values.grad is not None and values.grad.dtype == values.dtype and values.grad.shape == values.shape
    # The values' gradient is gathered with fp32 accumulation from the exact (upcast) inputs: fp32-tight.
    _assert_within(
        values.grad, grads_ref["values"], _rounding_bound(abs_ref["values"], torch.float32, num_tokens), "grad values"
    )

    if bias_mode == "trainable":
        assert bias.grad is not None and bias.grad.dtype == bias.dtype
        _assert_within(bias.grad, grads_ref["bias"], _rounding_bound(abs_ref["bias"], dtype, num_tokens), "grad bias")
    elif bias is not None:
        assert bias.grad is None

    if weight_requires_grad:
        assert weight.grad is not None and weight.grad.shape == weight.shape and weight.grad.dtype == weight.dtype
        _assert_within(
            weight.grad, grads_ref["weight"], _rounding_bound(abs_ref["weight"], dtype, num_tokens), "grad weight"
        )
    else:
        assert weight.grad is None

    assert torch.equal(weight.detach(), weight_before), "the base weight must not be modified"


@pytest.mark.parametrize(
    "x_dtype,values_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.float32),
    ],
)
def test_sparse_linear_values_grad_keeps_values_dtype(x_dtype, values_dtype):
    x, weight, bias, indices, values, grad_output = _make_layer_inputs(
        0, (4, 6), 5, 0.4, x_dtype, "frozen", False, torch.int32, False, values_dtype=values_dtype
    )
    y = sparse_linear(x, weight, bias, indices, values)
    assert y.dtype == x_dtype
    y.backward(grad_output)
    assert values.grad.dtype == values_dtype
    assert x.grad.dtype == x_dtype
    _, grads_ref, abs_ref = _dense_reference(x, weight, bias, indices, values, False, grad_output, False)
    bound = _rounding_bound(abs_ref["values"], torch.float32, 4)
    _assert_within(values.grad, grads_ref["values"], bound, "grad values")


def test_sparse_linear_only_values_trainable():
    """The common training setup: frozen input (first layer) and frozen base, only the values learn."""
    x, weight, bias, indices, values, grad_output = _make_layer_inputs(
        3, (2, 4, 10), 6, 0.2, torch.float32, "frozen", True, torch.int64, False
    )
    x.requires_grad_(False)
    y = sparse_linear(x, weight, bias, indices, values, True)
    y.backward(grad_output)
    assert x.grad is None and weight.grad is None and bias.grad is None
    _, grads_ref, abs_ref = _dense_reference(x, weight, bias, indices, values, True, grad_output, False)
    bound = _rounding_bound(abs_ref["values"], torch.float32, 8)
    _assert_within(values.grad, grads_ref["values"], bound, "grad values")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_sparse_linear_non_contiguous_x(fan_in_fan_out):
    gen = _generator(11)
    in_features, out_features = 9, 5
    x = _randn((in_features, 6), gen).t().requires_grad_()  # (6, 9), transposed storage
    logical = _randn((out_features, in_features), gen)
    weight = logical.t().contiguous() if fan_in_fan_out else logical
    indices = _unique_sorted_indices(45, 12, gen, torch.int32)
    values = _randn(12, gen).requires_grad_()
    grad_output = _randn((6, out_features), gen)
    y = sparse_linear(x, weight, None, indices, values, fan_in_fan_out)
    y.backward(grad_output)
    y_ref, grads_ref, abs_ref = _dense_reference(x, weight, None, indices, values, fan_in_fan_out, grad_output, False)
    _assert_within(y, y_ref, _rounding_bound(abs_ref["y"], torch.float32, in_features), "output")
    _assert_within(x.grad, grads_ref["x"], _rounding_bound(abs_ref["x"], torch.float32, out_features), "grad x")
    _assert_within(values.grad, grads_ref["values"], _rounding_bound(abs_ref["values"], torch.float32, 6), "grad v")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 4)])
def test_sparse_linear_gradcheck(fan_in_fan_out, x_shape):
    gen = _generator(13)
    out_features, in_features = 3, x_shape[-1]
    x = _randn(x_shape, gen, torch.float64).requires_grad_()
    logical = _randn((out_features, in_features), gen, torch.float64)
    weight = (logical.t().contiguous() if fan_in_fan_out else logical).requires_grad_()
    bias = _randn(out_features, gen, torch.float64).requires_grad_()
    indices = torch.tensor([0, 2, 5, 6, 11], dtype=torch.int32)
    values = _randn(5, gen, torch.float64).requires_grad_()

    def fn(x, weight, bias, values):
        return sparse_linear(x, weight, bias, indices, values, fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, values), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_sparse_linear_gradcheck_x_and_values_only():
    gen = _generator(17)
    x = _randn((4, 5), gen, torch.float64).requires_grad_()
    weight = _randn((5, 6), gen, torch.float64)  # (in, out) storage
    indices = torch.tensor([1, 4, 9, 17, 29], dtype=torch.int64)
    values = _randn(5, gen, torch.float64).requires_grad_()

    def fn(x, values):
        return sparse_linear(x, weight, None, indices, values, True)

    assert torch.autograd.gradcheck(fn, (x, values), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_sparse_linear_does_not_save_a_merged_weight():
    """The backward recomputes W0 + delta; only the caller's own tensors may be saved for it."""
    gen = _generator(19)
    out_features, in_features = 11, 7
    weight = _randn((out_features, in_features), gen)
    x = _randn((3, in_features), gen).requires_grad_()
    indices = _unique_sorted_indices(77, 10, gen, torch.int32)
    values = _randn(10, gen).requires_grad_()
    own_pointers = {t.data_ptr() for t in (x, weight, indices, values)}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = sparse_linear(x, weight, None, indices, values)
    dense_sized = [t for t in saved if t.numel() == out_features * in_features and t.data_ptr() not in own_pointers]
    assert not dense_sized, f"a dense out x in tensor was saved for backward: {[tuple(t.shape) for t in dense_sized]}"
    y.sum().backward()
    assert values.grad is not None


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_is_logical_contiguous_copy(fan_in_fan_out, dtype):
    gen = _generator(23)
    logical = _randn((4, 6), gen)
    weight = logical.t().contiguous() if fan_in_fan_out else logical.clone()
    weight_before = weight.clone()
    indices = torch.tensor([0, 7, 23], dtype=torch.int32)
    values = torch.tensor([1.0, -2.0, 0.5])
    merged = ops.merged_weight(weight, indices, values, fan_in_fan_out, dtype)
    assert merged.shape == (4, 6) and merged.dtype == dtype and merged.is_contiguous()
    assert torch.equal(weight, weight_before)
    expected = (logical.double() + _brute_force_delta((4, 6), indices, values)).to(dtype)
    bound = 2 * torch.finfo(dtype).eps * (logical.double().abs() + 2)
    _assert_within(merged, expected.double(), bound, "merged_weight")


@pytest.mark.parametrize(
    "indices,values",
    [
        (torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0])),
        (torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]])),
    ],
)
def test_sparse_linear_rejects_bad_indices(indices, values):
    with pytest.raises(ValueError):
        sparse_linear(torch.zeros(2, 3), torch.zeros(4, 3), None, indices, values)


# ----------------------------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_backend_cpu_is_known(monkeypatch, device):
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    assert ops.backend(device) in ("cpp", "cuda", "cupy", "reference")
    assert set(BACKENDS) == {"cpp", "cuda", "cupy", "reference"}


def test_backend_default_argument(monkeypatch):
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    assert ops.backend() == ops.backend("cpu")


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_backend_force_reference(monkeypatch, value):
    monkeypatch.setenv(FORCE_REFERENCE_ENV, value)
    assert FORCE_REFERENCE_ENV == "PEFT_SPARSE_FORCE_REFERENCE"
    assert ops.backend("cpu") == "reference"


@pytest.mark.parametrize("device", ["not_a_device", "cpu:x", ""])
def test_backend_rejects_malformed_device(device):
    with pytest.raises((RuntimeError, ValueError)):
        ops.backend(device)

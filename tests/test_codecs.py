"""Wire codecs: error bounds, exact edge cases, byte sizes, and decode's defence against bad input.

Bounds tested (derived in strategies/codecs.py's docstring; s = block absmax for fp4,
a = tensor absmax for fp8):
    fp32  exact
    bf16  |x̂ − x| ≤ 2^-8·|x|
    fp8   |x̂ − x| ≤ 2^-4·|x| where |x|·448/a ≥ 2^-6 (e4m3 normal range), else ≤ 2^-10·a/448
    fp4   |x̂ − x| ≤ |x|/3 where |x| ≥ s·2^-6, else ≤ s·2^-7; |x̂| ∈ {0, s·2^-6, ..., s/2, s}
The fp8/fp4 bounds carry a 1e-5 relative slack for the fp32 rounding of the scaling.
"""

import math

import numpy as np
import pytest
import torch

from fl_diloco import config
from strategies.codecs import (
    FP4_BLOCK_SIZE,
    SEP,
    WIRE_PRECISIONS,
    CodecError,
    decode_tensors,
    encode_tensors,
    encoded_nbytes,
    round_trip,
)

SLACK = 1 + 1e-5
LOSSY = ("bf16", "fp8", "fp4")
ODD_SHAPES = [(), (1,), (3,), (127,), (129,), (FP4_BLOCK_SIZE - 1,), (FP4_BLOCK_SIZE + 1,),
              (2, 3, 5), (3, FP4_BLOCK_SIZE + 7), (0,), (4, 0, 2)]


def gaussian(shape, scale=1e-3, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def fp4_block_absmax(x: torch.Tensor) -> torch.Tensor:
    """The absmax of each element's block, broadcast back to the flat tensor."""
    flat = x.reshape(-1).abs()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % FP4_BLOCK_SIZE)])
    per_block = padded.reshape(-1, FP4_BLOCK_SIZE).amax(dim=1)
    return per_block.repeat_interleave(FP4_BLOCK_SIZE)[: flat.numel()]


def error_bound(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest |x̂ − x| each element may have, flat, in float64."""
    x = x.reshape(-1).double().abs()
    if precision == "fp32":
        return torch.zeros_like(x)
    if precision == "bf16":
        return 2.0**-8 * x
    if precision == "fp8":
        step = x.max() / 448 if x.numel() else torch.zeros(())
        normal = x >= 2.0**-6 * step
        return torch.where(normal, 2.0**-4 * x, 2.0**-10 * step) * SLACK
    s = fp4_block_absmax(x)
    return torch.where(x >= s * 2.0**-6, x / 3, s * 2.0**-7) * SLACK


def assert_within_bound(x: torch.Tensor, decoded: torch.Tensor, precision: str) -> None:
    err = (decoded.reshape(-1).double() - x.reshape(-1).double()).abs()
    bound = error_bound(x, precision)
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{precision}: element {worst} of {x.reshape(-1)[worst]} decoded as "
        f"{decoded.reshape(-1)[worst]}, error {err[worst]:.3e} > bound {bound[worst]:.3e}")


def test_wire_precisions_are_the_configs():
    assert WIRE_PRECISIONS == config.WIRE_PRECISIONS == ("fp32", "bf16", "fp8", "fp4")


def test_unknown_precision_is_rejected_listing_the_allowed_ones():
    x = {"w": torch.ones(3)}
    for call in (lambda: encode_tensors(x, "int8"), lambda: decode_tensors({}, "int8", {})):
        with pytest.raises(ValueError) as info:
            call()
        assert all(p in str(info.value) for p in WIRE_PRECISIONS)


# --- accuracy ------------------------------------------------------------------------------


def test_fp32_round_trip_is_exact():
    x = {"a": gaussian((17, 9)), "b": torch.tensor([-0.0, 1e-38, 3.4e38, -1.5])}
    out = round_trip(x, "fp32")
    for name, value in x.items():
        assert torch.equal(out[name], value)


def test_bf16_is_torch_round_to_nearest_even():
    x = gaussian((1000,), scale=1.0) * torch.logspace(-30, 30, 1000)
    assert torch.equal(round_trip({"w": x}, "bf16")["w"], x.to(torch.bfloat16).float())


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e25])
def test_random_tensors_decode_within_the_error_bound(precision, scale):
    x = gaussian((10, FP4_BLOCK_SIZE * 3 + 5), scale=scale)
    assert_within_bound(x, round_trip({"w": x}, precision)["w"], precision)


@pytest.mark.parametrize("precision", LOSSY)
def test_values_spanning_many_octaves_decode_within_the_error_bound(precision):
    # Every magnitude from far below to far above the fp4/fp8 levels, both signs.
    x = torch.logspace(-12, 0, 4001) * torch.tensor([1.0, -1.0]).repeat(2001)[:4001]
    assert_within_bound(x, round_trip({"w": x}, precision)["w"], precision)


def test_fp4_decodes_only_to_the_documented_levels():
    x = gaussian((FP4_BLOCK_SIZE * 8 + 3,))
    decoded = round_trip({"w": x}, "fp4")["w"].abs()
    s = fp4_block_absmax(x)
    ratio = decoded / s
    levels = torch.tensor([0.0] + [2.0**-k for k in range(7)])
    assert bool(torch.isin(ratio, levels).all())


def test_fp4_codes_and_layout_for_hand_computed_values():
    # One block with absmax 1: 1 -> m7; -0.5 -> −m6; 0.74 < 0.75 -> m6; 0.76 -> m7; 0 -> 0;
    # −2^-8 -> 0 (no sign on zero); 2^-7 is the 0/2^-6 tie -> m1 (away from zero); -0.3 < 0.375 -> −m5.
    x = torch.tensor([1.0, -0.5, 0.74, 0.76, 0.0, -(2.0**-8), 2.0**-7, -0.3, 0.1])
    arrays = encode_tensors({"w": x}, "fp4")
    assert sorted(arrays) == [f"w{SEP}codes", f"w{SEP}scales"]
    nibbles = [7, 8 | 6, 6, 7, 0, 0, 1, 8 | 5, 4, 0]  # 0.1 > 1.5·2^-4 -> 2^-3 (m4); then padding
    expected = [lo | hi << 4 for lo, hi in zip(nibbles[::2], nibbles[1::2])]
    assert arrays[f"w{SEP}codes"].tolist() == expected
    assert arrays[f"w{SEP}scales"].dtype == np.float32
    assert arrays[f"w{SEP}scales"].tolist() == [1.0]
    decoded = decode_tensors(arrays, "fp4", {"w": (9,)})["w"]
    assert decoded.tolist() == [1.0, -0.5, 0.5, 1.0, 0.0, 0.0, 2.0**-6, -0.25, 2.0**-3]


def test_fp8_codes_and_layout_for_hand_computed_values():
    # absmax 2 -> scaled 448 (0x7E, e4m3fn's max), −224 = −1.75·2^7 (0xF6), 0 (0x00).
    arrays = encode_tensors({"w": torch.tensor([2.0, -1.0, 0.0])}, "fp8")
    assert arrays[f"w{SEP}codes"].dtype == np.uint8
    assert arrays[f"w{SEP}codes"].tolist() == [0x7E, 0xF6, 0x00]
    assert arrays[f"w{SEP}scales"].tolist() == [2.0]


def test_bf16_sends_raw_bits_as_uint16():
    arrays = encode_tensors({"w": torch.tensor([[1.0, -2.0]])}, "bf16")
    assert arrays["w"].dtype == np.uint16 and arrays["w"].shape == (1, 2)
    assert arrays["w"].tolist() == [[0x3F80, 0xC000]]


def test_fp4_reproduces_every_block_absmax_exactly():
    x = gaussian((FP4_BLOCK_SIZE * 5 + 17,), scale=0.37, seed=3)
    decoded = round_trip({"w": x}, "fp4")["w"]
    assert torch.equal(fp4_block_absmax(decoded), fp4_block_absmax(x))
    # The element holding each block's max decodes to itself, sign included.
    blocks = torch.cat([x, x.new_zeros(-x.numel() % FP4_BLOCK_SIZE)]).reshape(-1, FP4_BLOCK_SIZE)
    top = blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * FP4_BLOCK_SIZE
    assert torch.equal(decoded[top], x[top])


# 7.859652 and 3.9952564: values where 448 · fl32(a/448) ≠ a, so a decoder that multiplies by
# a stored absmax/448 instead of dividing the code by 448 first would not give a back.
@pytest.mark.parametrize("absmax", [1e-30, 3e-3, 1.0, 7.123456, 7.859652, 3.9952564, 1e30, 3.3e38])
def test_fp8_reproduces_the_tensor_absmax_exactly(absmax):
    x = gaussian((1000,), scale=1.0, seed=4)
    x = x / x.abs().max() * absmax
    x[17] = -x.abs().max()  # the extreme is negative: the sign must survive too
    decoded = round_trip({"w": x}, "fp8")["w"]
    assert decoded[17].item() == x[17].item()
    assert decoded.abs().max().item() == x.abs().max().item()


def test_fp8_reproduces_many_random_absmaxes_exactly():
    absmax = torch.logspace(-20, 20, 400) * (1 + torch.rand(400, generator=torch.Generator().manual_seed(17)))
    x = {f"t{i}": gaussian((6,), seed=i) / 10 + a for i, a in enumerate(absmax.tolist())}
    out = round_trip(x, "fp8")
    for name, value in x.items():
        assert out[name].abs().max().item() == value.abs().max().item(), name


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_signs_are_never_flipped(precision):
    x = gaussian((FP4_BLOCK_SIZE * 4 + 1,), seed=5) * torch.logspace(-8, 0, FP4_BLOCK_SIZE * 4 + 1)
    decoded = round_trip({"w": x}, precision)["w"]
    assert bool((decoded * x >= 0).all())
    # Zero only where the value fell below half the smallest level; elsewhere the sign is kept.
    kept = decoded != 0
    assert torch.equal(torch.sign(decoded[kept]), torch.sign(x[kept]))


def test_fp4_only_flushes_values_below_half_the_smallest_level():
    x = gaussian((FP4_BLOCK_SIZE * 6,), seed=6)
    decoded = round_trip({"w": x}, "fp4")["w"]
    above = x.abs() >= fp4_block_absmax(x) * 2.0**-7
    assert bool((decoded[above] != 0).all())


def test_fp4_mean_relative_l2_error_of_a_gaussian():
    # Levels L and 2L with the split at 1.5L: for a value spread evenly over [L, 2L] the mean
    # squared error is L²/12 against a mean square of 7L²/3, i.e. relative L2 √(1/28) ≈ 0.189.
    # Gaussian blocks measure ≈ 0.193 (values below s·2^-7 add a little). 0.20 leaves room for
    # that, while truncating instead of rounding (√(1/7) ≈ 0.38) or a misplaced threshold fails.
    x = gaussian((1_000_000,), seed=7)
    decoded = round_trip({"w": x}, "fp4")["w"]
    relative_l2 = ((decoded - x).norm() / x.norm()).item()
    assert relative_l2 < 0.20
    assert relative_l2 > math.sqrt(1 / 28) - 0.01  # it is a 4-bit format; lower means a bug here


# --- edge cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_shapes_and_sizes_round_trip(precision, shape):
    x = gaussian(shape, seed=8) if math.prod(shape) else torch.zeros(shape)
    out = round_trip({"layer.weight": x}, precision)
    assert list(out) == ["layer.weight"]
    y = out["layer.weight"]
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device.type == "cpu"
    assert_within_bound(x, y, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("shape", [(), (1,), (FP4_BLOCK_SIZE + 1,), (3, 4)])
def test_all_zeros_decode_to_exact_zeros(precision, shape):
    y = round_trip({"w": torch.zeros(shape)}, precision)["w"]
    assert y.shape == shape and not bool(y.any())


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_tiny_and_huge_values_in_one_tensor(precision):
    x = torch.tensor([1e-30, -1e30, 3.0, -1e-30, 2e29, -7e-31])
    y = round_trip({"w": x}, precision)["w"]
    assert_within_bound(x, y, precision)
    assert y[1].item() == pytest.approx(-1e30, rel=2**-8)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_tiny_and_huge_tensors_keep_their_own_scale(precision):
    x = {"tiny": gaussian((300,), scale=1e-30, seed=9), "huge": gaussian((300,), scale=1e30, seed=10)}
    out = round_trip(x, precision)
    for name, value in x.items():
        assert_within_bound(value, out[name], precision)
        # Per-tensor (fp8) and per-block (fp4) scales keep a tiny tensor from flushing to zero.
        assert (out[name] - value).norm() <= 0.25 * value.norm()


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_many_tensors_keep_their_names(precision):
    x = {f"layers.{i}.mlp.weight": gaussian((i + 1, 3), seed=i) for i in range(5)}
    out = round_trip(x, precision)
    assert sorted(out) == sorted(x)
    for name, value in x.items():
        assert_within_bound(value, out[name], precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_encoded_as_their_fp32_value(precision, dtype):
    x = gaussian((40,), seed=11).to(dtype).requires_grad_()
    y = round_trip({"w": x}, precision)["w"]
    assert y.dtype == torch.float32
    assert_within_bound(x.detach().float(), y, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_encoding_leaves_inputs_untouched_and_unshared(precision):
    x = {"a": gaussian((FP4_BLOCK_SIZE + 3,), seed=12), "b": gaussian((2, 2), seed=13)}
    before = {name: t.clone() for name, t in x.items()}
    arrays = encode_tensors(x, precision)
    for name, value in x.items():
        assert torch.equal(value, before[name])
    snapshot = {key: a.copy() for key, a in arrays.items()}
    for t in x.values():
        t.mul_(-3.0)  # the sender reuses its buffers after encoding
    assert all(np.array_equal(arrays[key], snapshot[key]) for key in arrays)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_encoding_is_deterministic(precision):
    x = {"a": gaussian((FP4_BLOCK_SIZE * 3 + 1,), seed=14), "b": gaussian((5, 7), seed=15)}
    first, second = encode_tensors(x, precision), encode_tensors(x, precision)
    assert list(first) == list(second)
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert first[key].tobytes() == second[key].tobytes()


# --- encode rejects -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_rejected_naming_the_tensor(precision, bad):
    x = gaussian((10,))
    x[4] = bad
    with pytest.raises(ValueError, match="blocks.3.attn.weight"):
        encode_tensors({"ok": torch.ones(2), "blocks.3.attn.weight": x}, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_float64_beyond_the_float32_range_is_rejected(precision):
    with pytest.raises(ValueError, match="'w'"):
        encode_tensors({"w": torch.tensor([1.0, 1e300], dtype=torch.float64)}, precision)


def test_bf16_rejects_values_that_would_round_to_inf():
    with pytest.raises(ValueError, match="'w'"):
        encode_tensors({"w": torch.tensor([3.4e38])}, "bf16")


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_bad_names_and_dtypes_are_rejected(precision):
    with pytest.raises(ValueError, match="separator"):
        encode_tensors({f"a{SEP}b": torch.ones(2)}, precision)
    with pytest.raises(ValueError, match="'steps'"):
        encode_tensors({"steps": torch.ones(2, dtype=torch.int64)}, precision)


# --- size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision,low,high", [("fp32", 1.0, 1.0), ("bf16", 0.5, 0.5),
                                                ("fp8", 0.25, 0.2501), ("fp4", 0.125, 0.14)])
def test_bytes_on_the_wire(precision, low, high):
    x = {"w": gaussian((1_000_000,))}
    ratio = encoded_nbytes(encode_tensors(x, precision)) / (4 * 1_000_000)
    assert low <= ratio <= high


def test_fp4_byte_count_is_half_a_byte_per_value_plus_one_float32_per_block():
    n = FP4_BLOCK_SIZE * 10 + 3
    arrays = encode_tensors({"w": gaussian((n,))}, "fp4")
    assert encoded_nbytes(arrays) == (n + 1) // 2 + 4 * -(-n // FP4_BLOCK_SIZE)


# --- decode rejects -------------------------------------------------------------------------

NAME = "h.0.w"
CODES_KEY, SCALES_KEY = f"{NAME}{SEP}codes", f"{NAME}{SEP}scales"
SHAPE = (FP4_BLOCK_SIZE + 5,)  # odd: fp4 has a padding nibble and a partial block


def encoded(precision: str) -> dict[str, np.ndarray]:
    return encode_tensors({NAME: gaussian(SHAPE, seed=16), "other": torch.ones(3)}, precision)


def decode(arrays, precision):
    return decode_tensors(arrays, precision, {NAME: SHAPE, "other": (3,)})


def main_key(precision: str) -> str:
    return NAME if precision in ("fp32", "bf16") else CODES_KEY


def assert_rejected(arrays, precision, match=NAME):
    with pytest.raises(CodecError, match=match.replace(".", r"\.").replace("|", r"\|")):
        decode(arrays, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_valid_arrays_decode(precision):
    # The control for the rejection tests below: the same arrays, unmodified, are accepted.
    out = decode(encoded(precision), precision)
    assert sorted(out) == sorted([NAME, "other"])


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.uint32, np.float16])
def test_decode_rejects_a_wrong_dtype(precision, dtype):
    arrays = encoded(precision)
    key = main_key(precision)
    arrays[key] = arrays[key].astype(dtype)
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_decode_rejects_a_non_array(precision):
    arrays = encoded(precision)
    arrays[main_key(precision)] = arrays[main_key(precision)].tolist()
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_decode_rejects_the_wrong_number_of_codes(precision, change):
    arrays = encoded(precision)
    key = main_key(precision)
    flat = arrays[key].reshape(-1)
    arrays[key] = flat[:-1] if change == "truncate" else np.concatenate([flat, flat[:1]])
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_decode_rejects_a_missing_scale(precision):
    arrays = encoded(precision)
    del arrays[SCALES_KEY]
    assert_rejected(arrays, precision, match=SCALES_KEY)


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_decode_rejects_non_finite_or_negative_scales(precision, bad):
    arrays = encoded(precision)
    arrays[SCALES_KEY] = arrays[SCALES_KEY].copy()
    arrays[SCALES_KEY][-1] = bad
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
@pytest.mark.parametrize("change", ["drop", "add"])
def test_decode_rejects_the_wrong_number_of_scales(precision, change):
    arrays = encoded(precision)
    scales = arrays[SCALES_KEY]
    arrays[SCALES_KEY] = scales[:-1] if change == "drop" else np.concatenate([scales, scales[:1]])
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_decode_rejects_float64_scales(precision):
    arrays = encoded(precision)
    arrays[SCALES_KEY] = arrays[SCALES_KEY].astype(np.float64)
    assert_rejected(arrays, precision)


@pytest.mark.parametrize("precision", WIRE_PRECISIONS)
def test_decode_rejects_extra_and_missing_tensors(precision):
    arrays = encoded(precision)
    arrays["intruder"] = np.zeros(3, dtype=np.float32)
    assert_rejected(arrays, precision, match="intruder")
    arrays = encoded(precision)
    for key in [k for k in arrays if k.startswith("other")]:
        del arrays[key]
    assert_rejected(arrays, precision, match="other")


@pytest.mark.parametrize("bits", [0x7F80, 0xFF80, 0x7FC0, 0xFFFF])  # +Inf, −Inf, NaN, NaN
def test_decode_rejects_bf16_bits_that_are_not_finite(bits):
    arrays = encoded("bf16")
    arrays[NAME] = arrays[NAME].copy()
    arrays[NAME][7] = bits
    assert_rejected(arrays, "bf16")


@pytest.mark.parametrize("bits", [0x7F, 0xFF])  # e4m3fn's only NaNs
def test_decode_rejects_fp8_nan_codes(bits):
    arrays = encoded("fp8")
    arrays[CODES_KEY] = arrays[CODES_KEY].copy()
    arrays[CODES_KEY][3] = bits
    assert_rejected(arrays, "fp8")


def test_decode_rejects_fp32_values_that_are_not_finite():
    arrays = encoded("fp32")
    arrays[NAME] = arrays[NAME].copy()
    arrays[NAME][0] = np.inf
    assert_rejected(arrays, "fp32")


def test_decode_rejects_a_nonzero_fp4_padding_nibble():
    arrays = encoded("fp4")
    arrays[CODES_KEY] = arrays[CODES_KEY].copy()
    arrays[CODES_KEY][-1] |= 0x10
    assert_rejected(arrays, "fp4", match="padding")


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_every_possible_code_byte_decodes_to_a_finite_value_or_is_rejected(precision):
    # A hostile client controls every byte; none may crash decode or sneak NaN/Inf through.
    n = 512 if precision == "fp4" else 256
    arrays = {f"w{SEP}codes": np.arange(256, dtype=np.uint8),
              f"w{SEP}scales": np.full(-(-n // FP4_BLOCK_SIZE) if precision == "fp4" else 1,
                                       3.4e38, dtype=np.float32)}
    try:
        out = decode_tensors(arrays, precision, {"w": (n,)})["w"]
    except CodecError:
        assert precision == "fp8"  # its two NaN bytes are in the range
        arrays[f"w{SEP}codes"] = arrays[f"w{SEP}codes"][(np.arange(256) & 0x7F) != 0x7F]
        arrays[f"w{SEP}codes"] = np.concatenate([arrays[f"w{SEP}codes"], np.zeros(2, np.uint8)])
        out = decode_tensors(arrays, precision, {"w": (n,)})["w"]
    assert bool(torch.isfinite(out).all())
    assert out.abs().max().item() == pytest.approx(3.4e38, rel=1e-6)

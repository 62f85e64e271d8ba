"""Wire codecs for outer gradients: named fp32 tensors to named numpy arrays and back.

Pure tensor code (torch + numpy, no Flower): the client encodes its outer gradient with
`encode_tensors`, Flower ships the numpy arrays, and the server rebuilds fp32 tensors with
`decode_tensors`. Decoding is also the server's first line of defence against a hostile or
broken client, so it validates every array and raises `CodecError` (a `ValueError`) naming
the tensor instead of crashing or silently producing NaN/Inf.

Formats (`precision`), for a tensor `name` with n elements, flattened in C order:

fp32
    key `name`: the float32 array, in the tensor's shape. Exact.

bf16
    key `name`: uint16 array (tensor's shape) holding the raw bfloat16 bits, rounded to
    nearest-even by torch. numpy has no bfloat16 and Flower's Array goes through numpy, so the
    bits travel as uint16. A finite fp32 value beyond bfloat16's range (|x| > ~3.39e38) would
    round to Inf: encode rejects it. Error: |x̂ − x| ≤ 2^-8·|x|.

fp8 (e4m3fn: 1 sign, 4 exponent, 3 mantissa bits; max finite 448; no Inf)
    key `name|codes`:  uint8[n], the raw e4m3fn bits of x · 448 / absmax.
    key `name|scales`: float32[1], the tensor's absmax (max |x|).
    Outer gradients are ~1e-3, while e4m3's normal range starts at 2^-6 and its subnormals end
    at 2^-9, so unscaled fp8 would flush most of them to zero: the tensor is first scaled so
    its absmax lands on 448, the largest code. The side value is the absmax itself, i.e. the
    value code 448 decodes to (the per-code step is absmax/448): storing absmax/448 instead
    could not give absmax back exactly in fp32 arithmetic, and this way it does, with no
    underflow of absmax/448 for tiny tensors either. Decoding is x̂ = fp8(code)/448 · absmax.
    All-zero tensor: absmax 0, codes 0, decodes to exact zeros.
    Error, with y = x·448/absmax the scaled value: round-to-nearest-even with 3 mantissa bits
    gives |ŷ − y| ≤ 2^-4·|y| where |y| ≥ 2^-6 (normal range) and |ŷ − y| ≤ 2^-10 (half the
    subnormal spacing 2^-9) below it. In x units:
        |x̂ − x| ≤ 2^-4·|x|                 if |x| ≥ 2^-6 · absmax/448
        |x̂ − x| ≤ 2^-10 · absmax/448      otherwise
    up to fp32 rounding in the scaling (a few 2^-24 relative).

fp4 (E3M0: 1 sign bit, 3 exponent bits, no mantissa), blocks of FP4_BLOCK_SIZE values
    key `name|codes`:  uint8[ceil(n/2)]; value i is the low nibble of byte i//2 when i is even
                       and the high nibble when i is odd. If n is odd the last high nibble is
                       padding and must be 0.
    key `name|scales`: float32[ceil(n/FP4_BLOCK_SIZE)], the absmax s of each block of
                       FP4_BLOCK_SIZE consecutive values (the last block may be partial).
    Nibble = sign << 3 | m. Code table for the magnitude m:
        m = 0      -> 0
        m = 1..7   -> s · 2^(m−7)      (s·2^-6, s·2^-5, ..., s/2, s)
    The sign bit is set only for negative values with m > 0, so zero is always nibble 0.
    The block absmax maps to m = 7 and is reproduced exactly. Rounding is deterministic, to
    the nearest level in the linear domain (ties away from zero): between neighbouring levels
    L and 2L the threshold is 1.5·L, and between 0 and the smallest level L₁ = s·2^-6 it is
    L₁/2. Error bound (exact, since s·2^(m−7) needs no rounding while it is fp32-normal):
        |x̂ − x| ≤ |x|/3        if |x| ≥ L₁ = s·2^-6   (worst case at x = 1.5·L)
        |x̂ − x| ≤ L₁/2 = s·2^-7  otherwise
    Values much smaller than their block's absmax therefore become zero: fp4 is a coarse
    format and only meant for quantities that tolerate it.
    Scale dtype and block size: scales are float32 and the block is 128 values, so a block
    costs 64 code bytes + 4 scale bytes = 68 bytes vs 512 in fp32, a ratio of 0.133 (≤ 0.14).
    float16 scales with 64-value blocks would cost exactly the same ratio, but float16 cannot
    hold an absmax below ~6e-5 (its smallest normal) or above 65504 without losing it, and
    bfloat16 scales would not reproduce the absmax exactly; float32 has neither problem.

Key separator: `SEP` ("|") never occurs in a PyTorch parameter name (those are dotted Python
attribute paths); encode refuses names containing it so keys can never collide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fl_diloco.config import WIRE_PRECISIONS

__all__ = [
    "FP4_BLOCK_SIZE",
    "SEP",
    "WIRE_PRECISIONS",
    "CodecError",
    "decode_tensors",
    "encode_tensors",
    "encoded_nbytes",
    "round_trip",
    "wire_keys",
]

SEP = "|"
CODES = "codes"
SCALES = "scales"

FP4_BLOCK_SIZE = 128
# Exponent-only levels: magnitude code m in 1..7 means 2^(m - FP4_TOP_CODE) times the block absmax.
FP4_TOP_CODE = 7
FP4_SIGN_BIT = 0b1000

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_NAN_BITS = 0x7F  # e4m3fn has no Inf; S.1111.111 are its only NaNs

# Decoded value of each fp4 nibble, as a fraction of the block absmax.
_FP4_MAGNITUDES = np.array([0.0] + [2.0 ** (m - FP4_TOP_CODE) for m in range(1, FP4_TOP_CODE + 1)],
                           dtype=np.float32)
_FP4_NIBBLE_VALUES = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES])
_FP4_NIBBLE_VALUES[FP4_SIGN_BIT] = 0.0  # sign bit with magnitude 0: never emitted, read as +0
# Ratio |x|/s at which the code steps from m to m+1: midway between the levels, i.e. 2^-7
# between 0 and 2^-6, then 1.5·2^(m−7) between 2^(m−7) and 2^(m−6).
_FP4_THRESHOLDS = [2.0 ** -FP4_TOP_CODE] + [1.5 * 2.0 ** (m - FP4_TOP_CODE)
                                           for m in range(1, FP4_TOP_CODE)]


class CodecError(ValueError):
    """Encoded arrays are malformed; the message names the tensor and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Public API


def encode_tensors(tensors: Mapping[str, torch.Tensor], precision: str) -> dict[str, np.ndarray]:
    """Encode named tensors for the wire; see the module docstring for the layout.

    Raises ValueError for an unknown precision, a name containing SEP, a non-float tensor or a
    tensor with NaN/Inf (a gradient like that is a bug upstream, not something to quantize).
    """
    _check_precision(precision)
    encoder = _ENCODERS[precision]
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        arrays.update(encoder(name, _as_fp32_cpu(name, tensor)))
    return arrays


def decode_tensors(
    arrays: Mapping[str, np.ndarray],
    precision: str,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Rebuild fp32 CPU tensors named exactly as `shapes` from encoded arrays.

    Raises CodecError if the keys are not exactly those `shapes` implies, or if any array has
    the wrong dtype or size, a non-finite or negative scale, or codes that decode to NaN/Inf.
    """
    _check_precision(precision)
    _check_keys(arrays, precision, shapes)
    for name, shape in shapes.items():
        # fp32 and bf16 travel in the tensor's own shape: a transposed or reshaped array with
        # the right element count is still wrong.
        shaped = arrays.get(name)
        if isinstance(shaped, np.ndarray) and tuple(shaped.shape) != tuple(shape):
            raise CodecError(f"tensor {name!r} has shape {tuple(shaped.shape)}, expected {tuple(shape)}")
    decoder = _DECODERS[precision]
    return {name: decoder(name, arrays, _numel(name, shape)).reshape(tuple(shape))
            for name, shape in shapes.items()}


def round_trip(tensors: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """decode(encode(tensors)): exactly what the receiver will see."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return decode_tensors(encode_tensors(tensors, precision), precision, shapes)


def encoded_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of encoded arrays (before any framing or compression by the transport)."""
    return sum(int(a.nbytes) for a in arrays.values())


def wire_keys(name: str, precision: str) -> tuple[str, ...]:
    """The array keys one tensor occupies on the wire."""
    if precision in ("fp32", "bf16"):
        return (name,)
    return (f"{name}{SEP}{CODES}", f"{name}{SEP}{SCALES}")


# ---------------------------------------------------------------------------------------------
# Checks shared by encode and decode


def _check_precision(precision: str) -> None:
    if precision not in WIRE_PRECISIONS:
        raise ValueError(f"unknown wire precision {precision!r}; allowed: {', '.join(WIRE_PRECISIONS)}")


def _as_fp32_cpu(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if SEP in name:
        raise ValueError(f"tensor name {name!r} contains the wire key separator {SEP!r}")
    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name!r}: expected a floating-point tensor, got {tensor.dtype}")
    # May return the caller's own tensor: everything downstream must stay out-of-place.
    x = tensor.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"tensor {name!r} contains NaN or Inf (in float32); refusing to encode it")
    return x


def _check_keys(arrays: Mapping[str, np.ndarray], precision: str,
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    expected = {key for name in shapes for key in wire_keys(name, precision)}
    missing, extra = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or extra:
        raise CodecError(f"{precision} arrays do not match the expected tensors: "
                         f"missing {missing}, unexpected {extra}")


def _numel(name: str, shape: tuple[int, ...]) -> int:
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise CodecError(f"tensor {name!r}: invalid declared shape {shape!r}")
    return math.prod(int(d) for d in shape)


def _array(arrays: Mapping[str, np.ndarray], key: str, name: str, dtype: type, size: int) -> np.ndarray:
    """The array under `key`, checked for dtype and element count; returned flat."""
    a = arrays[key]
    if not isinstance(a, np.ndarray):
        raise CodecError(f"tensor {name!r}: {key!r} is a {type(a).__name__}, not a numpy array")
    if a.dtype != np.dtype(dtype):
        raise CodecError(f"tensor {name!r}: {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.size != size:
        raise CodecError(f"tensor {name!r}: {key!r} has {a.size} elements, expected {size}")
    return a.reshape(-1)


def _scales(arrays: Mapping[str, np.ndarray], name: str, count: int) -> torch.Tensor:
    scales = _array(arrays, f"{name}{SEP}{SCALES}", name, np.float32, count)
    # A negative scale would flip signs and a non-finite one poisons the average.
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError(f"tensor {name!r}: scales must be finite and non-negative")
    return torch.from_numpy(scales.copy())


def _require_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"tensor {name!r}: decodes to NaN or Inf")
    return x


# ---------------------------------------------------------------------------------------------
# fp32


def _encode_fp32(name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    # Copy so the wire array never aliases the caller's tensor.
    return {name: x.numpy().copy()}


def _decode_fp32(name: str, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    values = _array(arrays, name, name, np.float32, n)
    return _require_finite(name, torch.from_numpy(values.copy()))


# ---------------------------------------------------------------------------------------------
# bf16


def _encode_bf16(name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    rounded = x.to(torch.bfloat16)
    if not bool(torch.isfinite(rounded).all()):
        raise ValueError(f"tensor {name!r} has values beyond bfloat16's range (|x| > 3.39e38)")
    return {name: rounded.view(torch.int16).numpy().view(np.uint16).copy()}


def _decode_bf16(name: str, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    bits = _array(arrays, name, name, np.uint16, n)
    values = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    return _require_finite(name, values)


# ---------------------------------------------------------------------------------------------
# fp8 (e4m3fn, one absmax per tensor)


def _encode_fp8(name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    flat = x.reshape(-1)
    absmax = flat.abs().max() if flat.numel() else torch.zeros(())
    # x / absmax is in [-1, 1] and never overflows or divides by zero; scaling by 448 is then
    # exact but for the ×7, and the clamp keeps a last-ulp excess from reaching the cast.
    unit = flat / absmax if absmax > 0 else torch.zeros_like(flat)
    codes = (unit * FP8_MAX).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {
        f"{name}{SEP}{CODES}": codes.view(torch.uint8).numpy().copy(),
        f"{name}{SEP}{SCALES}": absmax.reshape(1).numpy().astype(np.float32),
    }


def _decode_fp8(name: str, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    bits = _array(arrays, f"{name}{SEP}{CODES}", name, np.uint8, n)
    if ((bits & 0x7F) == _FP8_NAN_BITS).any():
        raise CodecError(f"tensor {name!r}: fp8 codes contain NaN bit patterns")
    absmax = _scales(arrays, name, 1)
    codes = torch.from_numpy(bits.copy()).view(torch.float8_e4m3fn).float()
    # code/448 first, so the top code gives 1.0 · absmax: the absmax comes back exactly.
    return (codes / FP8_MAX) * absmax


# ---------------------------------------------------------------------------------------------
# fp4 (E3M0, one absmax per block of FP4_BLOCK_SIZE)


def _fp4_blocks(flat: torch.Tensor) -> torch.Tensor:
    """Zero-pad a flat tensor to whole blocks and view it as (blocks, FP4_BLOCK_SIZE)."""
    padding = -flat.numel() % FP4_BLOCK_SIZE
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.reshape(-1, FP4_BLOCK_SIZE)


def _fp4_magnitude_codes(ratio: torch.Tensor) -> torch.Tensor:
    """Nearest level code 0..7 for ratio = |x|/s in [0, 1]: the number of thresholds reached."""
    codes = torch.zeros(ratio.shape, dtype=torch.uint8)
    # One comparison per threshold is simple and, unlike frexp/bucketize, fast on CPU.
    for threshold in _FP4_THRESHOLDS:
        codes += ratio >= threshold
    return codes


def _fp4_pack(nibbles: torch.Tensor) -> np.ndarray:
    """Two nibbles per byte, even index in the low half; an odd count gets a zero pad nibble."""
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().copy()


def _encode_fp4(name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    n = x.numel()
    blocks = _fp4_blocks(x.reshape(-1))
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # All-zero blocks: any positive divisor gives ratio 0 and code 0.
    ratio = blocks.abs() / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    magnitude = _fp4_magnitude_codes(ratio)
    negative = (blocks < 0) & (magnitude > 0)
    nibbles = magnitude | (negative.to(torch.uint8) << 3)
    return {
        f"{name}{SEP}{CODES}": _fp4_pack(nibbles.reshape(-1)[:n]),
        f"{name}{SEP}{SCALES}": absmax.reshape(-1).numpy().copy(),
    }


def _fp4_unpack(name: str, packed: np.ndarray, n: int) -> np.ndarray:
    nibbles = np.empty((packed.size, 2), dtype=np.uint8)
    nibbles[:, 0] = packed & 0x0F
    nibbles[:, 1] = packed >> 4
    nibbles = nibbles.reshape(-1)
    if nibbles.size > n and nibbles[n] != 0:
        raise CodecError(f"tensor {name!r}: fp4 padding nibble is not zero")
    return nibbles[:n]


def _decode_fp4(name: str, arrays: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    blocks = -(-n // FP4_BLOCK_SIZE)
    packed = _array(arrays, f"{name}{SEP}{CODES}", name, np.uint8, -(-n // 2))
    absmax = _scales(arrays, name, blocks)
    nibbles = _fp4_unpack(name, packed, n)
    fractions = torch.from_numpy(_FP4_NIBBLE_VALUES[nibbles])
    padded = _fp4_blocks(fractions)
    # Fraction 2^(m−7) times the block absmax: exact while the product stays fp32-normal.
    return (padded * absmax[:, None]).reshape(-1)[:n]


_ENCODERS = {"fp32": _encode_fp32, "bf16": _encode_bf16, "fp8": _encode_fp8, "fp4": _encode_fp4}
_DECODERS = {"fp32": _decode_fp32, "bf16": _decode_bf16, "fp8": _decode_fp8, "fp4": _decode_fp4}

"""The geometry of window ops (convolution, pooling), computed and checked once per call.

Every engine receives a :class:`ConvGeometry` or :class:`PoolGeometry` from the public API, so
output sizes and argument checks live here only.

Notation (shared by the reference, the engines and the CUDA kernels):
    N batch, C input channels, H W input height and width, F filters (output channels),
    G groups, KH KW kernel, SH SW stride, PH PW zero padding, DH DW dilation,
    OH = (H + 2*PH - DH*(KH-1) - 1) // SH + 1 and OW likewise (floor mode), P = OH*OW,
    K = (C/G)*KH*KW (the length of one receptive field of one group), T = KH*KW (taps).
A tap (kh, kw) of output (oh, ow) reads input row oh*SH - PH + kh*DH, column ow*SW - PW + kw*DW.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator

from ._checks import pair


def out_size(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Output length of a window op along one axis (floor mode)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class _Window:
    """What convolution and pooling geometries share (the fields come from the namedtuple)."""

    __slots__ = ()
    # the namedtuple fields these properties read (annotations only, for the type checker)
    N: int
    C: int
    H: int
    W: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int
    OH: int
    OW: int

    @property
    def P(self) -> int:
        return self.OH * self.OW

    @property
    def T(self) -> int:
        return self.KH * self.KW

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def kernel_size(self) -> tuple:
        return (self.KH, self.KW)

    @property
    def stride(self) -> tuple:
        return (self.SH, self.SW)

    @property
    def padding(self) -> tuple:
        return (self.PH, self.PW)


class ConvGeometry(_Window, namedtuple("ConvGeometry", "N C H W F KH KW SH SW PH PW DH DW OH OW G", defaults=(1,))):
    __slots__ = ()

    @property
    def K(self) -> int:
        """One group's receptive field: (C/G)*KH*KW."""
        return self.C // self.G * self.KH * self.KW

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.F, self.OH, self.OW)

    @property
    def dilation(self) -> tuple:
        return (self.DH, self.DW)


def conv_geometry(x_shape, F, kernel_size, stride=1, padding=0, dilation=1, groups=1, what="x") -> ConvGeometry:
    """The geometry of a convolution of an input of ``x_shape`` (N, C, H, W) with F filters,
    every argument checked (the message names it)."""
    N, C, H, W = (int(s) for s in x_shape)
    KH, KW = pair("kernel_size", kernel_size, minimum=1)
    SH, SW = pair("stride", stride, minimum=1)
    PH, PW = pair("padding", padding, minimum=0)
    DH, DW = pair("dilation", dilation, minimum=1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if C % groups or F % groups:
        raise ValueError(f"groups: expected a divisor of the {C} input and {F} output channels, got {groups}")
    eff_h, eff_w = DH * (KH - 1) + 1, DW * (KW - 1) + 1
    if eff_h > H + 2 * PH or eff_w > W + 2 * PW:
        raise ValueError(
            f"kernel_size: the (dilated) kernel {eff_h}x{eff_w} must fit the padded input "
            f"{H + 2 * PH}x{W + 2 * PW} ({what} {H}x{W}, padding {PH},{PW}), got kernel {KH}x{KW}, dilation {DH},{DW}"
        )
    OH, OW = out_size(H, KH, SH, PH, DH), out_size(W, KW, SW, PW, DW)
    return ConvGeometry(N, C, H, W, F, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW, groups)


class PoolGeometry(_Window, namedtuple("PoolGeometry", "N C H W KH KW SH SW PH PW OH OW")):
    __slots__ = ()

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.C, self.OH, self.OW)


def pool_geometry(x_shape, kernel_size, stride=None, padding=0) -> PoolGeometry:
    """The geometry of a pooling window over ``x_shape`` (N, C, H, W); stride defaults to the kernel."""
    N, C, H, W = (int(s) for s in x_shape)
    KH, KW = pair("kernel_size", kernel_size, minimum=1)
    SH, SW = pair("stride", (KH, KW) if stride is None else stride, minimum=1)
    PH, PW = pair("padding", padding, minimum=0)
    if 2 * PH > KH or 2 * PW > KW:
        raise ValueError(f"padding: expected at most half the kernel size ({KH // 2}, {KW // 2}), got ({PH}, {PW})")
    if KH > H + 2 * PH or KW > W + 2 * PW:
        raise ValueError(
            f"kernel_size: the {KH}x{KW} window must fit the padded input {H + 2 * PH}x{W + 2 * PW} "
            f"(x {H}x{W}, padding {PH},{PW})"
        )
    return PoolGeometry(N, C, H, W, KH, KW, SH, SW, PH, PW, out_size(H, KH, SH, PH), out_size(W, KW, SW, PW))


# ----------------------------------------------------------------------------- taps
def tap_slices(g) -> Iterator[tuple[int, int, slice, slice]]:
    """(kh, kw, rows, cols) for every tap: the slices of the *padded* input that tap reads
    for all outputs (a strided view each). ``g``: a ConvGeometry or PoolGeometry."""
    DH, DW = getattr(g, "DH", 1), getattr(g, "DW", 1)
    for kh in range(g.KH):
        rows = slice(kh * DH, kh * DH + g.SH * (g.OH - 1) + 1, g.SH)
        for kw in range(g.KW):
            yield kh, kw, rows, slice(kw * DW, kw * DW + g.SW * (g.OW - 1) + 1, g.SW)


def clipped_range(k: int, out_len: int, size: int, s: int, p: int, d: int = 1) -> tuple[slice, slice] | None:
    """For tap ``k`` along one axis: (outputs, inputs), the slice of outputs whose input index
    ``o*s - p + k*d`` lies inside the *unpadded* axis [0, size), and the input slice they read.
    None when the tap reads only padding."""
    off = k * d - p  # input index read by output 0
    lo = max(0, -(off // s))  # the first o with o*s + off >= 0, i.e. ceil(-off / s)
    hi = min(out_len, (size - 1 - off) // s + 1)  # one past the last o with o*s + off <= size - 1
    if hi <= lo:
        return None
    return slice(lo, hi), slice(lo * s + off, (hi - 1) * s + off + 1, s)


def clipped_taps(g) -> Iterator[tuple[int, int, slice, slice, slice, slice]]:
    """(kh, kw, out_rows, out_cols, in_rows, in_cols) for every tap that reads at least one input
    element: tap (kh, kw) of outputs [out_rows, out_cols] reads the *unpadded* input at
    [in_rows, in_cols]; its other outputs read padding."""
    DH, DW = getattr(g, "DH", 1), getattr(g, "DW", 1)
    for kh in range(g.KH):
        r = clipped_range(kh, g.OH, g.H, g.SH, g.PH, DH)
        if r is None:
            continue
        for kw in range(g.KW):
            c = clipped_range(kw, g.OW, g.W, g.SW, g.PW, DW)
            if c is not None:
                yield kh, kw, r[0], c[0], r[1], c[1]


class CropFlip(namedtuple("CropFlip", "N C H W OH OW PH PW reflect crop_key flip_key flip_threshold")):
    """One batch's random crop + horizontal flip (cnn_gpu.data.augment; reference.crop_flip):
    x (N, C, H, W) padded by (PH, PW) (zeros, or ``reflect``), an (OH, OW) window per sample at
    offsets drawn from ``crop_key``, mirrored when (bits(flip_key, n) >> 11) < ``flip_threshold``.
    The keys are 64-bit counter_rng keys (Python ints); flip_threshold = ceil(p * 2**53)."""

    __slots__ = ()

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.C, self.OH, self.OW)


__all__ = [
    "CropFlip",
    "ConvGeometry",
    "PoolGeometry",
    "conv_geometry",
    "pool_geometry",
    "out_size",
    "tap_slices",
    "clipped_range",
    "clipped_taps",
]

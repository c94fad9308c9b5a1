"""Gray-mapped square QAM (BPSK, QPSK, 16-QAM, 64-QAM): mapper, hard demapper, exact BER.

A Gray square M-QAM symbol is two independent Gray sqrt(M)-PAM symbols on I and Q, so the
mapper and the demapper work on real PAM levels (float32) and never loop over symbols.
Constellations have unit average symbol energy, Es = 1. SNRs here are Es/N0 unless a name
says ``ebn0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import erfc

from airlora.errors import LinkError

MODULATIONS = {"bpsk": 1, "qpsk": 2, "16qam": 4, "64qam": 6}


def check_modulation(name: str) -> str:
    key = name.lower().replace("-", "")
    if key not in MODULATIONS:
        raise LinkError(f"unknown modulation '{name}'; choose one of {sorted(MODULATIONS)}")
    return key


def db_to_linear(db: float | np.ndarray) -> float | np.ndarray:
    return 10.0 ** (np.asarray(db, dtype=np.float64) / 10.0)


def qfunc(x: np.ndarray | float) -> np.ndarray:
    return 0.5 * erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


@dataclass(frozen=True)
class Modulation:
    """One Gray square-QAM scheme.

    Parameters
    ----------
    name:
        ``bpsk``, ``qpsk``, ``16qam`` or ``64qam``.
    """

    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", check_modulation(self.name))

    @property
    def bits_per_symbol(self) -> int:
        return MODULATIONS[self.name]

    @property
    def is_real(self) -> bool:
        """BPSK uses the I axis only."""
        return self.bits_per_symbol == 1

    @property
    def bits_per_axis(self) -> int:
        return 1 if self.is_real else self.bits_per_symbol // 2

    @cached_property
    def _pam(self) -> tuple[np.ndarray, np.ndarray, float]:
        m = self.bits_per_axis
        levels = 2**m
        index = np.arange(levels)
        gray = index ^ (index >> 1)  # level index -> Gray label
        label_to_index = np.empty(levels, dtype=np.int64)
        label_to_index[gray] = index
        # Unit Es: PAM levels +-1, +-3, ... scaled; QAM splits the energy over I and Q.
        mean_power = (levels**2 - 1) / 3.0
        scale = 1.0 / math.sqrt(mean_power * (1 if self.is_real else 2))
        amplitude = ((2 * label_to_index - (levels - 1)) * scale).astype(np.float32)
        return amplitude, gray.astype(np.uint8), scale

    @property
    def pam_scale(self) -> float:
        """Distance from a PAM level to the nearest decision boundary."""
        return self._pam[2]

    # -------------------------------------------------------------- mapping on real axes

    def bits_to_axis_labels(self, bits: np.ndarray) -> np.ndarray:
        """Group unpacked bits (uint8 0/1) into per-axis Gray labels, I then Q per symbol."""
        m = self.bits_per_axis
        groups = bits.reshape(-1, m)
        if m == 1:
            return groups[:, 0]
        weights = (1 << np.arange(m - 1, -1, -1)).astype(np.uint8)
        return (groups * weights).sum(axis=1, dtype=np.uint8)

    def axis_labels_to_bits(self, labels: np.ndarray) -> np.ndarray:
        m = self.bits_per_axis
        if m == 1:
            return labels.astype(np.uint8)
        shifts = np.arange(m - 1, -1, -1, dtype=np.uint8)
        return ((labels[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)

    def modulate_axes(self, bits: np.ndarray) -> np.ndarray:
        """Bits -> real PAM amplitudes (float32), two per QAM symbol (I, Q), one for BPSK."""
        amplitude, _, _ = self._pam
        return amplitude[self.bits_to_axis_labels(bits)]

    def demodulate_axes(self, values: np.ndarray) -> np.ndarray:
        """Hard decisions on real amplitudes -> bits (uint8 0/1)."""
        _, gray, scale = self._pam
        levels = 2**self.bits_per_axis
        index = np.rint((values / scale + (levels - 1)) * 0.5)
        np.clip(index, 0, levels - 1, out=index)
        return self.axis_labels_to_bits(gray[index.astype(np.intp)])

    # -------------------------------------------------------------- complex symbols

    def modulate(self, bits: np.ndarray) -> np.ndarray:
        """Bits -> complex64 symbols with unit average energy."""
        axes = self.modulate_axes(bits)
        if self.is_real:
            return axes.astype(np.complex64)
        return axes.reshape(-1, 2).view(np.complex64).reshape(-1)

    def demodulate(self, symbols: np.ndarray) -> np.ndarray:
        """Complex symbols (already equalised) -> hard-decision bits."""
        if self.is_real:
            return self.demodulate_axes(symbols.real.astype(np.float32))
        axes = np.ascontiguousarray(symbols.astype(np.complex64)).view(np.float32)
        return self.demodulate_axes(axes)

    # -------------------------------------------------------------- theory

    def ber_awgn(self, esn0_db: float | np.ndarray) -> np.ndarray:
        """Exact bit error rate of Gray square QAM on AWGN with hard decisions.

        Sums, over every transmitted PAM level and every decision region, the probability of
        landing there times the Hamming distance of the two Gray labels.
        """
        esn0 = np.asarray(db_to_linear(esn0_db), dtype=np.float64)
        return self._ber_given_snr(esn0)

    def _ber_given_snr(self, esn0: np.ndarray) -> np.ndarray:
        _, gray, scale = self._pam
        levels = 2**self.bits_per_axis
        # Noise per real axis: N0/2 with Es = 1.
        sigma = np.sqrt(1.0 / (2.0 * esn0))[..., None, None]
        tx = np.arange(levels)[:, None]
        rx = np.arange(levels)[None, :]
        # Decision region of level j: boundaries at (2j - levels) * scale and (2j + 2 - levels).
        lower = np.where(rx == 0, -np.inf, (2 * rx - levels) * scale)
        upper = np.where(rx == levels - 1, np.inf, (2 * rx + 2 - levels) * scale)
        center = (2 * tx - (levels - 1)) * scale
        prob = qfunc((lower - center) / sigma) - qfunc((upper - center) / sigma)
        hamming = np.array(
            [
                [bin(int(gray[i]) ^ int(gray[j])).count("1") for j in range(levels)]
                for i in range(levels)
            ]
        )
        return (prob * hamming).sum(axis=(-1, -2)) / (levels * self.bits_per_axis)

    def ber_rayleigh(self, esn0_db: float | np.ndarray, rician_k: float = 0.0) -> np.ndarray:
        """BER averaged over Rayleigh (or Rician, K factor) flat fading with perfect CSI.

        Adaptive quadrature of the AWGN BER over the density of the power gain |h|^2
        (E|h|^2 = 1): exponential for Rayleigh, scaled non-central chi-square for Rician.
        """
        from scipy.integrate import quad
        from scipy.stats import ncx2

        esn0 = np.atleast_1d(np.asarray(db_to_linear(esn0_db), dtype=np.float64))

        def pdf(g: float) -> float:
            if rician_k == 0.0:
                return math.exp(-g)
            c = 2 * (rician_k + 1)
            return c * ncx2.pdf(c * g, 2, 2 * rician_k)

        def integrand(g: float, s: float) -> float:
            return pdf(g) * float(self._ber_given_snr(np.asarray(s * g)))

        out = np.array([quad(integrand, 0, np.inf, args=(s,), limit=200)[0] for s in esn0])
        return out if np.ndim(esn0_db) else out[0]


def bpsk_rayleigh_ber(esn0_db: float | np.ndarray) -> np.ndarray:
    """Closed form for BPSK on Rayleigh fading: 0.5 (1 - sqrt(g / (1 + g))), g = Es/N0."""
    g = db_to_linear(esn0_db)
    return 0.5 * (1.0 - np.sqrt(g / (1.0 + g)))


def pick_modulation(esn0_db: float, target_ber: float, fading: str = "awgn") -> Modulation:
    """Adaptive modulation: the most bits per symbol whose theoretical BER meets the target.

    Falls back to BPSK when none does.
    """
    for name in ("64qam", "16qam", "qpsk", "bpsk"):
        mod = Modulation(name)
        ber = mod.ber_awgn(esn0_db) if fading == "awgn" else mod.ber_rayleigh(esn0_db)
        if float(ber) <= target_ber:
            return mod
    return Modulation("bpsk")

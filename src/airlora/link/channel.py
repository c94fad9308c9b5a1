"""Channels (AWGN, Rayleigh and Rician block fading, CSI) and seeded SNR processes.

Block fading draws one complex gain h per block (a packet, or the whole transmission of a
round) with E|h|^2 = 1. The receiver equalises with its estimate of h: the true value
(perfect CSI) or a least-squares estimate from one unit-energy pilot at a pilot SNR.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from airlora.errors import LinkError

ChannelKind = Literal["awgn", "rayleigh", "rician"]


@dataclass(frozen=True)
class ChannelModel:
    """Flat block-fading channel.

    Parameters
    ----------
    kind: ``awgn``, ``rayleigh`` or ``rician``.
    rician_k: Rician K factor (linear power ratio of line-of-sight to scatter). Default 4.
    block: ``packet`` draws a gain per packet, ``round`` one per transmission, ``symbol``
        one per symbol (fast fading; what BER-versus-theory curves average over).
    csi: ``perfect`` or ``estimated`` (least-squares from one pilot per block).
    pilot_snr_db: SNR of the pilot; default: the data SNR.
    """

    kind: ChannelKind = "awgn"
    rician_k: float = 4.0
    block: Literal["packet", "round", "symbol"] = "packet"
    csi: Literal["perfect", "estimated"] = "perfect"
    pilot_snr_db: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("awgn", "rayleigh", "rician"):
            raise LinkError(f"unknown channel '{self.kind}'; choose awgn, rayleigh or rician")
        if self.rician_k < 0:
            raise LinkError(f"rician_k must be >= 0, got {self.rician_k}")

    @property
    def fading(self) -> bool:
        return self.kind != "awgn"

    def gains(self, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
        """Complex gains, one per block, E|h|^2 = 1 (all ones for AWGN)."""
        if self.kind == "awgn":
            return np.ones(n_blocks, dtype=np.complex64)
        scatter = (rng.standard_normal(n_blocks) + 1j * rng.standard_normal(n_blocks)) / math.sqrt(
            2.0
        )
        if self.kind == "rayleigh":
            return scatter.astype(np.complex64)
        k = self.rician_k
        los = math.sqrt(k / (k + 1.0))
        return (los + math.sqrt(1.0 / (k + 1.0)) * scatter).astype(np.complex64)

    def estimate(self, gains: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
        """The receiver's view of the gains: exact, or h + pilot noise (LS estimate)."""
        if self.csi == "perfect" or self.kind == "awgn":
            return gains
        pilot_db = snr_db if self.pilot_snr_db is None else self.pilot_snr_db
        n0 = 10.0 ** (-pilot_db / 10.0)
        noise = (rng.standard_normal(gains.size) + 1j * rng.standard_normal(gains.size)) * (
            math.sqrt(n0 / 2.0)
        )
        return (gains + noise).astype(np.complex64)


# ----------------------------------------------------------------------------- SNR processes


class SNRProcess:
    """A seeded sequence of per-round SNRs in dB; ``next()`` gives the next round's value."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def next(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self, n: int) -> np.ndarray:
        return np.array([self.next() for _ in range(n)])


class FixedSNR(SNRProcess):
    """The same SNR every round."""

    def __init__(self, snr_db: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.snr_db = float(snr_db)

    def next(self) -> float:
        return self.snr_db


class UniformSNR(SNRProcess):
    """Independent draws, uniform in dB over [low_db, high_db]."""

    def __init__(self, low_db: float, high_db: float, seed: int = 0) -> None:
        if high_db < low_db:
            raise LinkError(f"SNR range is empty: {low_db} > {high_db}")
        super().__init__(seed)
        self.low_db, self.high_db = float(low_db), float(high_db)

    def next(self) -> float:
        return float(self.rng.uniform(self.low_db, self.high_db))


class GaussMarkovSNR(SNRProcess):
    """First-order Gauss-Markov process in dB (mobility).

    s_{t+1} = mean + rho (s_t - mean) + sqrt(1 - rho^2) std w_t, started in its stationary law;
    rho near 1 means a slowly moving user.
    """

    def __init__(self, mean_db: float, std_db: float, rho: float, seed: int = 0) -> None:
        if not -1.0 < rho < 1.0:
            raise LinkError(f"correlation rho must lie in (-1, 1), got {rho}")
        if std_db < 0:
            raise LinkError(f"std_db must be >= 0, got {std_db}")
        super().__init__(seed)
        self.mean_db, self.std_db, self.rho = float(mean_db), float(std_db), float(rho)
        self._state: float | None = None

    def next(self) -> float:
        if self._state is None:
            self._state = self.mean_db + self.std_db * float(self.rng.standard_normal())
        else:
            innovation = math.sqrt(1.0 - self.rho**2) * self.std_db
            self._state = (
                self.mean_db
                + self.rho * (self._state - self.mean_db)
                + innovation * float(self.rng.standard_normal())
            )
        return self._state


class TraceSNR(SNRProcess):
    """A recorded trace: a CSV file with one dB value per round (a header line is allowed).

    The trace repeats when an episode is longer than it.
    """

    def __init__(self, path: Path | str, seed: int = 0) -> None:
        super().__init__(seed)
        self.path = Path(path)
        self.values = read_snr_trace(self.path)
        self._i = 0

    def next(self) -> float:
        value = float(self.values[self._i % len(self.values)])
        self._i += 1
        return value


def read_snr_trace(path: Path) -> np.ndarray:
    """dB values from the first column of a CSV; fails with the row and the reason.

    Rows are numbered from the first data row, as in data files (a header is not a row)."""
    if not path.is_file():
        raise LinkError(f"SNR trace {path}: no such file")
    values: list[float] = []
    header = 0
    with open(path, newline="", encoding="utf-8") as fh:
        for line_number, row in enumerate(csv.reader(fh), start=1):
            row_number = line_number - header
            if not row or not row[0].strip():
                raise LinkError(f"SNR trace {path}, row {row_number}: missing value")
            try:
                value = float(row[0])
            except ValueError:
                if line_number == 1:
                    header = 1
                    continue
                raise LinkError(
                    f"SNR trace {path}, row {row_number}: '{row[0]}' is not a number (dB)"
                ) from None
            if not math.isfinite(value):
                raise LinkError(f"SNR trace {path}, row {row_number}: value {row[0]} is not finite")
            values.append(value)
    if not values:
        raise LinkError(f"SNR trace {path}: holds no values")
    return np.asarray(values)

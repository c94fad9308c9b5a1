"""BER measurement against theory, and the BER-curve figure (`airlora link simulate|plot`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from airlora.errors import LinkError
from airlora.link.channel import ChannelModel
from airlora.link.digital import PacketChannel
from airlora.link.modulation import MODULATIONS, Modulation
from airlora.runs import atomic_write

SIM_PACKET_BITS = 8192


def simulate_ber(
    modulation: str,
    snr_db: float,
    n_bits: int = 1_000_000,
    channel: str = "awgn",
    rician_k: float = 4.0,
    seed: int = 0,
    fast_path: bool = False,
) -> dict:
    """Send ``n_bits`` random bits through mapper, channel and hard demapper; count errors.

    Fading draws a gain per symbol (fast fading, so that the average converges to the
    theory averaged over the fading law); CSI is perfect. ``fast_path`` samples bit errors
    directly where that is exact (BPSK/QPSK on AWGN); by default every symbol is simulated.
    """
    if n_bits <= 0:
        raise LinkError(f"n_bits must be positive, got {n_bits}")
    mod = Modulation(modulation)
    model = ChannelModel(channel, rician_k, block="symbol")
    link = PacketChannel(mod, model, SIM_PACKET_BITS, fast_path=fast_path)
    rng = np.random.default_rng(seed)
    n_packets = max(1, -(-n_bits // link.frame_bits))
    tx = rng.integers(0, 256, (n_packets, SIM_PACKET_BITS // 8), dtype=np.uint8)
    errors = link._errors(tx, snr_db, rng)
    sent = n_packets * link.frame_bits
    if channel == "awgn":
        theory = float(mod.ber_awgn(snr_db))
    else:
        theory = float(mod.ber_rayleigh(snr_db, rician_k if channel == "rician" else 0.0))
    measured = errors.size / sent
    return {
        "modulation": mod.name,
        "channel": channel,
        "snr_db": float(snr_db),
        "snr_definition": "Es/N0 (energy per symbol over noise density)",
        "ebn0_db": float(snr_db - 10 * np.log10(mod.bits_per_symbol)),
        "n_bits": int(sent),
        "bit_errors": int(errors.size),
        "measured_ber": measured,
        "theory_ber": theory,
        "relative_error": abs(measured - theory) / theory if theory > 0 else None,
        "fast_path": link.uses_fast_path,
        "seed": seed,
    }


def plot_ber_curves(
    path: Path,
    snr_db: np.ndarray | None = None,
    n_bits: int = 200_000,
    seed: int = 0,
) -> Path:
    """Measured (markers) against theoretical (lines) BER for every modulation, AWGN and
    Rayleigh, in one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snr_db = np.arange(-4, 31, 2) if snr_db is None else np.asarray(snr_db)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, channel in zip(axes, ("awgn", "rayleigh"), strict=True):
        for i, name in enumerate(MODULATIONS):
            color = f"C{i}"
            mod = Modulation(name)
            fine = np.linspace(snr_db.min(), snr_db.max(), 200)
            theory = mod.ber_awgn(fine) if channel == "awgn" else mod.ber_rayleigh(fine)
            ax.semilogy(fine, theory, color=color, label=f"{name} theory")
            measured = [
                simulate_ber(name, s, n_bits, channel, seed=seed + j)["measured_ber"]
                for j, s in enumerate(snr_db)
            ]
            measured = np.where(np.asarray(measured) > 0, measured, np.nan)
            ax.semilogy(snr_db, measured, "o", color=color, mfc="none", label=f"{name} measured")
        ax.set_title(
            f"{channel.upper() if channel == 'awgn' else 'Rayleigh'}, Gray mapping, hard decisions"
        )
        ax.set_xlabel("Es/N0 (dB)")
        ax.set_ylim(1e-5, 0.6)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("bit error rate")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle(f"airlora link model: measured ({n_bits:,} bits per point) vs theory")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path

"""Loss spikes: a run whose loss jumps up mid-run (an unstable optimization), flagged in its seed row, the verdict
and the dashboard rather than reported like any other run. The rule is SPIKE_RULE (loss range: max - min over the
whole run). Adam's ordinary jitter is a fraction of a percent of that range; a jump that undoes a tenth of the
whole descent within a few epochs is not. The first epochs are skipped because the loss of a fresh start can rise
while Adam's moments settle. Pure numpy: no MLflow, no words beyond the rule.
"""

from __future__ import annotations

import numpy as np

WARMUP = 0.10  # share of the epochs skipped at the start
WINDOW = 0.02  # the rise is measured against the lowest loss of this share of the epochs before (at least 1)
THRESHOLD = 0.10  # a rise of more than this share of the run's loss range is a spike
SPIKE_RULE = (f"a loss spike: after the first {WARMUP:.0%} of the epochs, the loss rises above the lowest loss of "
              f"the previous {WINDOW:.0%} of the epochs (at least one) by more than {THRESHOLD:.0%} of the run's "
              "loss range")


def loss_spikes(loss) -> list[dict | None]:
    """Per run of loss [epochs, runs]: None, or the run's worst spike {epoch, rise, share, n_epochs} (epoch: the
    first epoch of that rise above the threshold; share: rise / range; n_epochs: epochs above the threshold). A run
    with a non-finite loss is None: divergence is reported on its own."""
    loss = np.asarray(loss, dtype=np.float64)  # [epochs, runs]
    epochs = loss.shape[0]
    window = max(1, int(round(WINDOW * epochs)))
    start = max(window, int(np.ceil(WARMUP * epochs)))
    out: list[dict | None] = []
    for curve in loss.T:  # [epochs]
        span = float(curve.max() - curve.min()) if np.isfinite(curve).all() else 0.0
        if span <= 0.0 or start >= epochs:
            out.append(None)
            continue
        before = np.lib.stride_tricks.sliding_window_view(curve[:-1], window)  # [epochs - window, window]
        rise = curve[window:] - before.min(axis=1)  # [epochs - window]: rise of epoch t = window + k
        rise[: start - window] = 0.0  # the warm-up is never a spike
        above = rise > THRESHOLD * span
        if not above.any():
            out.append(None)
            continue
        worst = int(rise.argmax())
        first = worst  # walk back to where this rise first crossed the threshold
        while first > 0 and above[first - 1]:
            first -= 1
        out.append({"epoch": window + first, "peak_epoch": window + worst, "rise": float(rise[worst]),
                    "share": float(rise[worst] / span), "n_epochs": int(above.sum())})
    return out


def spike_words(spikes: list[dict | None], seeds: list[int]) -> str:
    """One sentence naming the unstable runs, or '' when none spiked."""
    hit = [(seed, s) for seed, s in zip(seeds, spikes) if s is not None]
    if not hit:
        return ""
    each = "; ".join(f"seed {seed} at epoch {s['epoch']} (+{s['share']:.0%} of its loss range)" for seed, s in hit)
    return (f"Unstable: {len(hit)}/{len(spikes)} run{'' if len(spikes) == 1 else 's'} had {SPIKE_RULE}: {each}; "
            "their tokens may come from a different basin than the descent before the jump.")

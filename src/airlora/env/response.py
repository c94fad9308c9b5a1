"""What a round-formulation surrogate predicts from: the edge accuracy after a round.

The edge rebuilds its adapter from what arrived in that round alone, so its accuracy is a
function of (the server's adapter after the round, what of it arrived). The link part of that
is physics the link code computes exactly for any rank vector (which ranks of which projection
fit before the deadline, the packets' survival: :meth:`airlora.link.WirelessLink.
expected_delivery`); only the learning response is fitted:

- :class:`ResponseModel` (the surrogate): a ridge regression whose delivered-rank
  coefficients are bounded below by zero, so that more of the trained adapter arriving never
  predicts a worse edge (monotone in every projection's delivered rank). It reads the
  *delivered* rank per group of projections (type x depth band, log scale), whether anything
  arrived, delivered x progress; the round, the share of the rank budget trained so far, the
  edge's previous accuracy and what arrived in the previous round (together a proxy for how
  far the server has come, which varies a lot with the batch order), and the data's
  complexity (length, type-token ratio, rarity, tokens per word: the data alone, never the
  model's loss). Its penalty is chosen by cross-validation on the unbounded problem.
  Gradient-boosted trees with monotone constraints were tried first: held-out R^2 0.38-0.43
  against 0.47-0.49 for this model on the shipped rounds.
- :class:`RidgeModel`: the earlier surrogate, a ridge on eight global features (mean rank sent
  and delivered, progress, the previous accuracy, ...), kept as the peer of ``airlora bench
  surrogate``.

:func:`leave_one_episode_out` scores either on whole held-out episodes, beside the binomial
noise floor of the edge's evaluation split (:func:`binomial_noise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear
from sklearn.linear_model import RidgeCV
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from airlora.env.observation import projection_groups

Delivery = Callable[[Sequence[int], float], np.ndarray]
"""Expected delivered share of each item of a stream (sizes in parameters, SNR in dB): see
:meth:`airlora.link.WirelessLink.expected_delivery`."""

DATA_COMPLEXITY = ("length", "type_token_ratio", "rarity", "tokens_per_word")


@dataclass(frozen=True)
class RoundInputs:
    """What a surrogate may know of ``n`` rounds (arrays with n rows).

    trained: the ranks each projection trained with this round, (n, m).
    trained_share: mean over the episode's rounds so far (this one included) of the mean
        trained rank / r_max, (n,).
    sent: the ranks sent, (n, m) (the trained ones, or fewer when a checkpoint is re-scored).
    snr_db: the round's SNR, (n,).
    complexity: the data complexity features of :data:`DATA_COMPLEXITY`, (n, 4).
    progress: (round index + 1) / rounds, (n,).
    round_index: the round's index in its episode (0 first), (n,).
    previous_accuracy: the edge accuracy before the round, (n,).
    previous_sent: the ranks sent in the previous round, (n, m) (zeros in the first).
    previous_snr_db: the previous round's SNR, (n,).
    """

    trained: np.ndarray
    trained_share: np.ndarray
    sent: np.ndarray
    snr_db: np.ndarray
    complexity: np.ndarray
    progress: np.ndarray
    round_index: np.ndarray
    previous_accuracy: np.ndarray
    previous_sent: np.ndarray
    previous_snr_db: np.ndarray

    def __len__(self) -> int:
        return len(self.snr_db)


def inputs_from_rows(rows: Sequence, r_max: int) -> RoundInputs:
    """:class:`RoundInputs` of logged rounds (:class:`~airlora.env.surrogate.LoggedRound`).

    A round's history (trained ranks so far, what the previous round sent) comes from its
    episode's other rounds; counterfactual rows share the history of the round they re-score."""
    history: dict[tuple, dict[int, object]] = {}
    for r in rows:
        if r.kind != "counterfactual":
            history.setdefault((r.kind, r.episode, r.seed, r.policy), {})[r.round] = r
    m = len(rows[0].rank_vector) if rows else 0
    shares, prev_sent, prev_snr = [], [], []
    for r in rows:
        kind = "design" if r.kind == "counterfactual" else r.kind
        h = history.get((kind, r.episode, r.seed, r.policy), {})
        upto = [np.mean(o.rank_vector) / r_max for t, o in h.items() if t <= r.round]
        shares.append(float(np.mean(upto)) if upto else float(np.mean(r.rank_vector)) / r_max)
        before = h.get(r.round - 1)
        prev_sent.append(before.sent if before is not None else [0] * m)
        prev_snr.append(before.snr_db if before is not None else r.snr_db)
    complexity = np.asarray(
        [
            [
                np.nan if r.complexity.get(k) is None else float(r.complexity[k])
                for k in DATA_COMPLEXITY
            ]
            for r in rows
        ],
        np.float64,
    )
    return RoundInputs(
        trained=np.asarray([r.rank_vector for r in rows], np.float64),
        trained_share=np.asarray(shares),
        sent=np.asarray([r.sent for r in rows], np.float64),
        snr_db=np.asarray([r.snr_db for r in rows], np.float64),
        complexity=complexity,
        progress=np.asarray([(r.round + 1) / r.rounds for r in rows], np.float64),
        round_index=np.asarray([r.round for r in rows], np.int64),
        previous_accuracy=np.asarray([r.previous_accuracy for r in rows], np.float64),
        previous_sent=np.asarray(prev_sent, np.float64).reshape(len(rows), m),
        previous_snr_db=np.asarray(prev_snr, np.float64),
    )


class _LinkFeatures:
    """The link's part: delivered ranks per projection for the sent ranks at each SNR."""

    def __init__(
        self, projection_names: Sequence[str], r_max: int, params_per_rank, delivery
    ) -> None:
        if r_max <= 0:
            raise ValueError(f"r_max must be positive, got {r_max}")
        self.projection_names = list(projection_names)
        self.r_max = r_max
        m = len(self.projection_names)
        self.params_per_rank = (
            np.ones(m, np.int64) if params_per_rank is None else np.asarray(params_per_rank)
        )
        if self.params_per_rank.shape != (m,):
            raise ValueError(f"params_per_rank needs {m} entries, one per projection")
        self.delivery = delivery

    def delivered(self, sent: np.ndarray, snr_db: np.ndarray) -> np.ndarray:
        if self.delivery is None:
            return np.asarray(sent, np.float64)
        return np.stack(
            [
                r * self.delivery(r * self.params_per_rank, s)
                for r, s in zip(sent, snr_db, strict=True)
            ]
        )


class ResponseModel(_LinkFeatures):
    """The semi-analytic surrogate of the module docstring.

    Parameters
    ----------
    projection_names: the adapted projections, in rank-vector order (they define the groups).
    r_max: largest rank.
    params_per_rank: d_in + d_out of each projection (parameters per unit of rank); sizes the
        stream the link delivers. Default 1 each.
    delivery: the link's expected delivered share per projection; None: everything arrives.
    depth_bands: depth bands of the groups (type x band). Default 2.
    """

    def __init__(
        self,
        projection_names: Sequence[str],
        r_max: int,
        params_per_rank: Sequence[int] | None = None,
        delivery: Delivery | None = None,
        depth_bands: int = 2,
    ) -> None:
        super().__init__(projection_names, r_max, params_per_rank, delivery)
        self.group_names, groups = projection_groups(self.projection_names, depth_bands)
        self.groups = np.asarray(groups)
        self.metrics: dict[str, float] = {}
        self.coef_: np.ndarray | None = None

    @property
    def n_delivered_features(self) -> int:
        """The leading features that grow with the delivered ranks (bounded coefficients)."""
        return len(self.group_names) + 2

    def features(self, x: RoundInputs) -> np.ndarray:
        # Log scale: a rank's worth falls as ranks grow (rank 1 does much, rank 8 -> 9 little).
        scale = math.log1p(self.r_max)
        got = self.delivered(x.sent, x.snr_db)
        per_group = np.stack(
            [got[:, self.groups == g].mean(axis=1) for g in range(len(self.group_names))], 1
        )
        got_mean = np.log1p(got.mean(axis=1)) / scale
        before = np.log1p(self.delivered(x.previous_sent, x.previous_snr_db).mean(axis=1)) / scale
        first = (np.asarray(x.round_index) == 0).astype(np.float64)
        complexity = np.nan_to_num(x.complexity, nan=0.0)
        return np.column_stack(
            [
                np.log1p(per_group) / scale,
                (got_mean > 0).astype(np.float64),
                got_mean * x.progress,
                x.progress,
                x.trained_share,
                x.previous_accuracy,
                before,
                first,
                x.previous_accuracy * first,
                complexity,
            ]
        )

    def fit_features(self, f: np.ndarray, y: np.ndarray) -> ResponseModel:
        y = np.asarray(y, np.float64)
        self.mean_, self.scale_ = f.mean(axis=0), f.std(axis=0)
        # A constant column (its std is rounding noise) must stay a zero input, not +-1.
        constant = self.scale_ <= 1e-9 * (1.0 + np.abs(self.mean_))
        self.scale_[constant] = np.inf
        z = (f - self.mean_) / self.scale_
        alpha = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(z, y).alpha_
        k = z.shape[1]
        # Ridge as least squares on [z 1; sqrt(alpha) I 0], delivered coefficients >= 0.
        a = np.vstack([np.column_stack([z, np.ones(len(z))]), np.sqrt(alpha) * np.eye(k, k + 1)])
        b = np.concatenate([y, np.zeros(k)])
        lower = np.full(k + 1, -np.inf)
        lower[: self.n_delivered_features] = 0.0
        self.coef_ = lsq_linear(a, b, bounds=(lower, np.full(k + 1, np.inf))).x
        return self

    def predict_features(self, f: np.ndarray) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("fit the response model first")
        z = (f - self.mean_) / self.scale_
        return np.clip(z @ self.coef_[:-1] + self.coef_[-1], 0.0, 1.0)

    def fit(self, x: RoundInputs, y: np.ndarray) -> ResponseModel:
        return self.fit_features(self.features(x), y)

    def predict(self, x: RoundInputs) -> np.ndarray:
        return self.predict_features(self.features(x))


class RidgeModel(_LinkFeatures):
    """The earlier surrogate (peer of ``bench surrogate``): a ridge on eight features — the
    mean rank delivered and sent, progress, the previous accuracy, delivered squared, delivered
    x progress, whether anything arrived, delivered x the noise level 1 / (1 + SNR). Its
    penalty is chosen by leave-one-out cross-validation on the training rounds."""

    def __init__(
        self,
        projection_names: Sequence[str],
        r_max: int,
        params_per_rank: Sequence[int] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        super().__init__(projection_names, r_max, params_per_rank, delivery)
        self.pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))

    def features(self, x: RoundInputs) -> np.ndarray:
        got = self.delivered(x.sent, x.snr_db).mean(axis=1) / self.r_max
        sent = x.sent.mean(axis=1) / self.r_max
        noise = 1.0 / (1.0 + 10.0 ** (x.snr_db / 10.0))
        return np.column_stack(
            [
                got,
                sent,
                x.progress,
                x.previous_accuracy,
                got**2,
                got * x.progress,
                (got > 0).astype(np.float64),
                got * noise,
            ]
        )

    def fit_features(self, f: np.ndarray, y: np.ndarray) -> RidgeModel:
        self.pipeline.fit(f, np.asarray(y, np.float64))
        return self

    def predict_features(self, f: np.ndarray) -> np.ndarray:
        return np.clip(self.pipeline.predict(f), 0.0, 1.0)

    def fit(self, x: RoundInputs, y: np.ndarray) -> RidgeModel:
        return self.fit_features(self.features(x), y)

    def predict(self, x: RoundInputs) -> np.ndarray:
        return self.predict_features(self.features(x))


def binomial_noise(accuracy: np.ndarray, eval_rows: int) -> float:
    """Mean variance of an accuracy measured on ``eval_rows`` independent rows: the part of
    any surrogate's squared error that no model of the rounds can remove."""
    a = np.clip(np.asarray(accuracy, np.float64), 0.0, 1.0)
    return float(np.mean(a * (1.0 - a)) / eval_rows)


def leave_one_episode_out(
    make_model: Callable[[], ResponseModel | RidgeModel],
    rows: Sequence,
    r_max: int,
    eval_rows: int | None = None,
) -> dict[str, float]:
    """Fit on every episode but one, predict the held-out episode's real rounds (design and
    anchor rows; its counterfactual re-scores are neither fitted nor scored), for every
    episode. Returns R^2 and MAE over all held-out rounds, the MAE of predicting the training
    mean, and, given the edge split's size, the binomial noise floor (its RMSE, and the R^2 a
    perfect model of the expected accuracy would score).

    An episode and its paired replicates (``replicate_of``: the same rank vectors and SNRs
    from other seeds) are held out together. When the log has replicates, the ``replicate_
    mean_*`` entries also score the mean prediction of each held-out round against its mean
    accuracy over the seeds: a surrogate is blind to the seed, and the mean is the expected
    response it models, with the seed's noise divided by the number of replicates."""
    x = inputs_from_rows(rows, r_max)
    y = np.asarray([r.accuracy for r in rows], np.float64)
    # A re-score belongs to the episode it re-scored; the seed keeps two logs' episodes of
    # the same number apart when logs are concatenated; a replicate joins its original.
    keys = np.asarray(
        [
            f"{r.kind if r.kind != 'counterfactual' else 'design'}:{r.episode}:{_original_seed(r)}"
            for r in rows
        ]
    )
    scored_kind = np.asarray([r.kind in ("design", "anchor") for r in rows])
    episodes = sorted(set(keys[scored_kind]))
    if len(episodes) < 3:
        raise ValueError("leave-one-episode-out needs at least three logged episodes")
    features = make_model().features(x)  # the link's part does not depend on the fit
    pred = np.full(len(rows), np.nan)
    mean_pred = np.full(len(rows), np.nan)
    for e in episodes:
        held = keys == e
        model = make_model().fit_features(features[~held], y[~held])
        target = held & scored_kind
        pred[target] = model.predict_features(features[target])
        mean_pred[target] = y[~held & scored_kind].mean()
    scored = ~np.isnan(pred)
    out = {
        "loeo_r2": float(r2_score(y[scored], pred[scored])),
        "loeo_mae": float(mean_absolute_error(y[scored], pred[scored])),
        "loeo_mae_of_mean": float(mean_absolute_error(y[scored], mean_pred[scored])),
        "held_out_rounds": int(scored.sum()),
        "episodes": len(episodes),
    }
    if eval_rows:
        noise = binomial_noise(y[scored], eval_rows)
        out["noise_floor_rmse"] = math.sqrt(noise)
        spread = float(np.var(y[scored]))
        # Rounds that all scored alike leave nothing to explain (None, not -inf, in JSON).
        out["noise_floor_r2"] = float(1.0 - noise / spread) if spread > 0 else None
    replica = np.asarray([getattr(r, "replicate_of", None) is not None for r in rows])
    if replica[scored].any():
        cells: dict[tuple[str, int], list[int]] = {}
        for i in np.flatnonzero(scored):
            cells.setdefault((keys[i], rows[i].round), []).append(i)
        paired = [idx for idx in cells.values() if len(idx) > 1]
        y_mean = np.asarray([y[idx].mean() for idx in paired])
        p_mean = np.asarray([pred[idx].mean() for idx in paired])
        out["replicate_mean_r2"] = float(r2_score(y_mean, p_mean))
        out["replicate_mean_mae"] = float(mean_absolute_error(y_mean, p_mean))
        out["replicate_mean_rounds"] = len(paired)
        out["replicates_per_round"] = min(len(idx) for idx in paired)
        # The seed's variance: each round's variance over its seeds, averaged (for two
        # seeds, half their squared difference).
        seed_variance = float(np.mean([np.var(y[idx], ddof=1) for idx in paired]))
        out["replicate_seed_variance"] = seed_variance
        out["replicate_seed_variance_share"] = seed_variance / float(np.var(y[scored]))
        if (scored & ~replica).any():
            # Each seed's rounds alone: how much the score itself moves with the seed drawn.
            out["loeo_r2_originals"] = float(
                r2_score(y[scored & ~replica], pred[scored & ~replica])
            )
            out["loeo_r2_replicates"] = float(r2_score(y[scored & replica], pred[scored & replica]))
    return out


def _original_seed(row) -> int | None:
    replicate_of = getattr(row, "replicate_of", None)
    return replicate_of if replicate_of is not None else getattr(row, "seed", None)

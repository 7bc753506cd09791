"""Drift detection benchmark: the platform's detectors against river's ADWIN and the CUSUM
bound, on streams recorded from a real run, replayed with many seeds; and the monitoring
service's throughput and CPU per record against serving's maximum rate.

Streams (``loadtests/record_drift_streams.py`` recorded them once from the local stack: the
served production model's predictions, inputs and labels on the simulator's live traffic
before and after ``--concept-drift-at`` / ``--data-drift-at``):

- each replay (seed) builds a stream by a moving-block bootstrap (blocks of ``BLOCK`` events,
  which keeps the streams' short-range dependence: a card holder's consecutive payments,
  fraud bursts) from the recording's events before the change, then from those after it;
- delay = events (labelled events for concept drift) from the change to the first detection
  of that kind; a replay with no detection within the post-change part is a miss; a
  detection before the change is a false alarm (the replay is then scored as detected late);
- false alarms per million stationary events: every signal of the platform (all inputs, the
  pooled detector, the score, the concept detector) on long bootstrap streams of pre-change
  events, added up;
- a signal that raised a false alarm before the change in a replay is not credited with
  detecting the change in that replay (for the platform's signals and ADWIN's inputs alike);
- ADWIN (river 0.23, defaults) on the same streams: on the error bits (flagged != fraud) for
  concept drift, on each input's raw values for data drift (the fastest input counts);
- the CUSUM bound: the delay of an optimal CUSUM knowing both distributions at the platform's
  measured false-alarm rate, ``ln(1 / rate) / KL`` with KL per event between after and before
  (error bits; score decile x label; the pooled inputs' normal-score shift).

Writes var/bench/drift.md.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402
from river.drift import ADWIN  # noqa: E402

from services.monitoring.detectors import NormalScores  # noqa: E402
from services.monitoring.drift import (  # noqa: E402
    ConceptDetector,
    DataDetectors,
    DriftConfig,
    data_detectors_from_reference,
    data_detectors_from_warmup,
    signal_count,
)
from services.monitoring.live_metrics import LiveMetrics  # noqa: E402
from services.monitoring.monitor import LiveMonitor, MonitorConfig  # noqa: E402
from services.monitoring.settings import (  # noqa: E402
    DEFAULT_DRIFT_INPUTS,
    SHORT_MEMORY_DRIFT_INPUTS,
)
from services.shared.drift_reference import DriftReference  # noqa: E402
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2  # noqa: E402
from services.shared.usecase.features import MODEL_INPUTS  # noqa: E402

DATA = ROOT / "loadtests" / "data"
OUT = ROOT / "var" / "bench" / "drift.md"
SEEDS = int(os.environ.get("BENCH_DRIFT_SEEDS", "30"))
BLOCK = 200
CONCEPT_PRE, CONCEPT_POST = 6000, 8000  # labelled events before / after the change
DATA_PRE, DATA_POST = 6000, 8000
STATIONARY_EVENTS = int(os.environ.get("BENCH_DRIFT_STATIONARY", "1000000"))
ADWIN_STATIONARY = 100_000
# the recordings' history spans 2.4 h (the world of record_drift_streams.py): the 24 h
# windows still fill during them, so the inputs watched are those with at most an hour of
# memory (as a platform with a history shorter than a day would set MLOPS_MONITORING_DRIFT_INPUTS)
INPUTS = SHORT_MEMORY_DRIFT_INPUTS
SERVING_MAX_RPS = 5643  # BENCHMARKS.md, serving section (same machine, an earlier run)


def load(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(DATA / f"drift_{name}.npz", allow_pickle=False))


def load_reference() -> DriftReference:
    """The served version's drift reference (its training data), recorded with the streams."""
    path = DATA / "drift_reference.parquet"
    return DriftReference.from_parquet(path.read_bytes(), MODEL_INPUTS)


def blocks(indices: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A moving-block bootstrap of ``indices`` (in order) to ``length`` events."""
    out: list[np.ndarray] = []
    total = 0
    while total < length:
        start = int(rng.integers(0, max(len(indices) - BLOCK, 1)))
        piece = indices[start : start + BLOCK]
        out.append(piece)
        total += len(piece)
    return np.concatenate(out)[:length]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if math.isfinite(a) and math.isfinite(b) and b else "-"


def quantiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.median(values)), float(np.percentile(values, 90))


def fmt(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}"


# ----------------------------------------------------------------------------- concept


def concept_streams(rec: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    labelled = np.flatnonzero(rec["label"] >= 0)
    before = labelled[rec["predicted_at"][labelled] < float(rec["change_at"])]
    after = labelled[rec["predicted_at"][labelled] >= float(rec["change_at"])]
    return before, after


def run_concept(
    config: DriftConfig, rec: dict[str, np.ndarray], stream: np.ndarray, change: int
) -> tuple[int | None, int]:
    """(delay of the first detection at or after ``change``, false alarms before it)."""
    detector = ConceptDetector(config, signal_count(config))
    score, label = rec["score"].astype(float).tolist(), rec["label"].tolist()
    false_alarms = 0
    for i, row in enumerate(stream.tolist()):
        if detector.update(score[row], bool(label[row]), float(i)) is not None:
            if i < change:
                false_alarms += 1
            else:
                return i - change, false_alarms
    return None, false_alarms


def run_adwin(values: np.ndarray, change: int) -> tuple[int | None, int]:
    adwin = ADWIN()
    false_alarms = 0
    for i, value in enumerate(values.tolist()):
        adwin.update(value)
        if adwin.drift_detected:
            if i < change:
                false_alarms += 1
            else:
                return i - change, false_alarms
    return None, false_alarms


def kl_bernoulli(p1: float, p0: float) -> float:
    p1, p0 = min(max(p1, 1e-9), 1 - 1e-9), min(max(p0, 1e-9), 1 - 1e-9)
    return p1 * math.log(p1 / p0) + (1 - p1) * math.log((1 - p1) / (1 - p0))


def kl_score_label(rec: dict[str, np.ndarray], before: np.ndarray, after: np.ndarray) -> float:
    """KL per labelled event between after and before of (score decile, label)."""
    edges = np.quantile(rec["score"][before], np.linspace(0, 1, 11)[1:-1])

    def cells(rows: np.ndarray) -> np.ndarray:
        b = np.searchsorted(edges, rec["score"][rows])
        counts = np.bincount(b * 2 + rec["label"][rows].astype(int), minlength=20) + 0.5
        return np.asarray(counts / counts.sum())

    p1, p0 = cells(after), cells(before)
    return float((p1 * np.log(p1 / p0)).sum())


# ----------------------------------------------------------------------------- data


def inputs_of(rec: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    columns = [list(MODEL_INPUTS).index(n) for n in names]
    return np.nan_to_num(rec["features"][:, columns].astype(np.float64))


def first_data_detection(
    detectors: DataDetectors, x: np.ndarray, score: np.ndarray, config: DriftConfig, change: int
) -> tuple[int | None, int, str]:
    """(delay, false alarms before the change, what fired). A signal that raised a false
    alarm before the change in this replay is not credited with detecting it (it was
    alarming anyway), as for ADWIN."""
    false_alarms = 0
    noisy: set[str] = set()
    for start in range(0, len(x), 500):
        found = detectors.update(
            x[start : start + 500], score[start : start + 500],
            np.arange(start, min(start + 500, len(x)), dtype=float), config,
        )  # fmt: skip
        for d in found:
            at = int(d.onset_at) + d.samples - 1  # the row at which it fired
            if d.kind != "data":
                continue
            if at < change:
                false_alarms += 1
                noisy.add(d.signal)
            elif d.signal not in noisy:
                what = ",".join(d.inputs) if d.signal == "inputs" else d.signal
                return at - change, false_alarms, what
    return None, false_alarms, ""


def pooled_kl(reference_x: np.ndarray, before: np.ndarray, after: np.ndarray) -> float:
    transform = NormalScores(reference_x)
    zb, za = transform.transform(before), transform.transform(after)
    covariance = np.nan_to_num(np.corrcoef(zb, rowvar=False))
    np.fill_diagonal(covariance, 1.0)
    d = za.mean(axis=0) - zb.mean(axis=0)
    return float(d @ np.linalg.pinv(covariance, rcond=1e-6) @ d / 2)


# ----------------------------------------------------------------------------- throughput


def throughput(rec: dict[str, np.ndarray], reference: DriftReference | None) -> dict[str, float]:
    config = MonitorConfig(drift=DriftConfig(inputs=DEFAULT_DRIFT_INPUTS))
    monitor = LiveMonitor(config, LiveMetrics(CollectorRegistry()))
    n = min(len(rec["score"]), 20_000)
    payloads: list[bytes] = []
    labels: list[tuple[str, bool, float, int, int]] = []
    t0 = 1.8e9
    repeats = 3
    for r in range(repeats):
        for i in range(n):
            txid = f"tx-{r}-{i}"
            for route, version in (
                (monitoring_pb2.ROUTE_PRODUCTION, 1),
                (monitoring_pb2.ROUTE_SHADOW, 2),
            ):
                record = monitoring_pb2.PredictionRecord(
                    transaction=events_pb2.Transaction(transaction_id=txid, amount=10.0),
                    features=dict(zip(MODEL_INPUTS, rec["features"][i].tolist(), strict=True)),
                    fraud_probability=float(rec["score"][i]), flagged=bool(rec["flagged"][i]),
                    model_name="fraud_detector", model_version=version, route=route,
                )  # fmt: skip
                record.predicted_at.FromNanoseconds(int((t0 + r * n + i) * 1e9))
                payloads.append(record.SerializeToString())
            labels.append((txid, bool(rec["label"][i] == 1), t0 + r * n + i + 30, 0, r * n + i))
    # detectors in place, as in steady state
    monitor.add_predictions([(monitoring_pb2.PredictionRecord.FromString(payloads[0]), 0, 0)])
    monitor.reference_loaded("fraud_detector", 1, reference)
    if reference is not None:
        for job in monitor.build_jobs():
            monitor.install_data_detectors(job.model_name, job.version, job.build())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    batch = 2000
    for start in range(0, len(payloads), batch):
        decoded = [
            (monitoring_pb2.PredictionRecord.FromString(p), 0, start + j)
            for j, p in enumerate(payloads[start : start + batch])
        ]
        monitor.add_predictions(decoded)
        half = start // 2
        monitor.add_labels(labels[half : half + batch // 2])
    monitor.tick()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    records = len(payloads) + len(labels)
    return {
        "records": records,
        "cpu_us": cpu / records * 1e6,
        "records_per_s": records / wall,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------- main


def reference_kl(detectors: DataDetectors, before: np.ndarray, after: np.ndarray) -> float:
    """KL per event of the pooled normal-score shift from ``before`` to ``after``, in the
    reference's normal scores and with its covariance (what the pooled detector uses)."""
    transform, whiten = detectors.transform, detectors.pooled.whiten
    shift = transform.transform(after).mean(axis=0) - transform.transform(before).mean(axis=0)
    return max(float(np.sum((shift @ whiten) ** 2)) / 2, 1e-12)


def main() -> None:
    started = time.perf_counter()
    concept = load("concept")
    data = load("data")
    reference = load_reference()
    lines: list[str] = []
    config = DriftConfig(inputs=INPUTS)
    fa_target = config.false_alarms_per_million

    # --- concept drift
    before, after = concept_streams(concept)
    print(f"concept: {len(before)} labelled before, {len(after)} after the change", flush=True)
    ours: list[float] = []
    adwin: list[float] = []
    ours_miss = adwin_miss = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        stream = np.concatenate(
            [blocks(before, CONCEPT_PRE, rng), blocks(after, CONCEPT_POST, rng)]
        )
        delay, _ = run_concept(config, concept, stream, CONCEPT_PRE)
        ours_miss += delay is None
        if delay is not None:
            ours.append(delay)
        errors = (concept["flagged"][stream] != (concept["label"][stream] == 1)).astype(float)
        delay, _ = run_adwin(errors, CONCEPT_PRE)
        adwin_miss += delay is None
        if delay is not None:
            adwin.append(delay)
        print(f"  seed {seed}: ours {ours[-1:]}, adwin {adwin[-1:]}", flush=True)
    err_before = float((concept["flagged"][before] != (concept["label"][before] == 1)).mean())
    err_after = float((concept["flagged"][after] != (concept["label"][after] == 1)).mean())

    # --- data drift
    x_all = inputs_of(data, INPUTS)
    score_all = data["score"].astype(np.float64)
    rows_before = np.flatnonzero(data["predicted_at"] < float(data["change_at"]))
    rows_after = np.flatnonzero(data["predicted_at"] >= float(data["change_at"]))
    print(f"data: {len(rows_before)} events before, {len(rows_after)} after", flush=True)
    detectors_template = data_detectors_from_reference(config, reference)
    # the same detectors against the version's first live events instead of its training
    # data (what monitoring does for a version without a reference): the recording's first
    # DATA_WARMUP events are the reference, the replays draw from the rest
    # (half the recording's pre-change events when it has fewer than twice data_warmup)
    warmup = min(config.data_warmup, len(rows_before) // 2)
    warmup_rows = rows_before[:warmup]
    rows_before_live = rows_before[warmup:]
    warmup_template = data_detectors_from_warmup(config, x_all[warmup_rows], score_all[warmup_rows])
    ours_warm: list[float] = []
    warm_miss = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(2000 + seed)
        stream = np.concatenate(
            [blocks(rows_before_live, DATA_PRE, rng), blocks(rows_after, DATA_POST, rng)]
        )
        delay, _, _ = first_data_detection(
            _fresh(warmup_template), x_all[stream], score_all[stream], config, DATA_PRE
        )
        warm_miss += delay is None
        if delay is not None:
            ours_warm.append(delay)
    ours_data: list[float] = []
    adwin_data: list[float] = []
    named: dict[str, int] = {}
    ours_data_miss = adwin_data_miss = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(1000 + seed)
        stream = np.concatenate(
            [blocks(rows_before, DATA_PRE, rng), blocks(rows_after, DATA_POST, rng)]
        )
        detectors = _fresh(detectors_template)
        delay, _, what = first_data_detection(
            detectors, x_all[stream], score_all[stream], config, DATA_PRE
        )
        ours_data_miss += delay is None
        if delay is not None:
            ours_data.append(delay)
            named[what] = named.get(what, 0) + 1
        if seed < max(SEEDS // 3, 5):  # ADWIN per input is slow: a third of the seeds
            per_input = [run_adwin(x_all[stream, j], DATA_PRE) for j in range(x_all.shape[1])]
            # an input ADWIN flagged before the change is not credited (as for ours)
            found = [d for d, fa in per_input if d is not None and fa == 0]
            adwin_data_miss += not found
            if found:
                adwin_data.append(min(found))
        print(f"  seed {seed}: ours {ours_data[-1:]}, adwin fastest {adwin_data[-1:]}", flush=True)

    # --- false alarms on stationary streams, every signal
    rng = np.random.default_rng(7)
    stationary = blocks(rows_before, STATIONARY_EVENTS, rng)
    detectors = _fresh(detectors_template)
    data_alarms = 0
    for start in range(0, len(stationary), 2000):
        rows = stationary[start : start + 2000]
        data_alarms += len(detectors.update(
            x_all[rows], score_all[rows], np.arange(start, start + len(rows), dtype=float), config
        ))  # fmt: skip
    warm_stationary = blocks(rows_before_live, STATIONARY_EVENTS, rng)
    detectors = _fresh(warmup_template)
    warm_alarms = 0
    for start in range(0, len(warm_stationary), 2000):
        rows = warm_stationary[start : start + 2000]
        warm_alarms += len(detectors.update(
            x_all[rows], score_all[rows], np.arange(start, start + len(rows), dtype=float), config
        ))  # fmt: skip
    concept_stationary = blocks(before, STATIONARY_EVENTS, rng)
    _, concept_alarms = run_concept(
        config, concept, concept_stationary, len(concept_stationary) + 1
    )
    per_million = (data_alarms + concept_alarms) / (STATIONARY_EVENTS / 1e6)
    warm_per_million = (warm_alarms + concept_alarms) / (STATIONARY_EVENTS / 1e6)
    adwin_stationary = blocks(rows_before, ADWIN_STATIONARY, rng)
    adwin_alarms = sum(
        run_adwin(x_all[adwin_stationary, j], ADWIN_STATIONARY + 1)[1]
        for j in range(x_all.shape[1])
    )
    sample = concept_stationary[:ADWIN_STATIONARY]
    adwin_errors = (concept["flagged"][sample] != (concept["label"][sample] == 1)).astype(float)
    adwin_alarms += run_adwin(adwin_errors, ADWIN_STATIONARY + 1)[1]
    adwin_per_million = adwin_alarms / (ADWIN_STATIONARY / 1e6)

    # --- bounds
    measured_rate = max(per_million, 0.5) / 1e6  # per event; at least half a false alarm
    log_term = math.log(1 / measured_rate)
    bound_error_bits = log_term / max(kl_bernoulli(err_after, err_before), 1e-12)
    bound_score_label = log_term / max(kl_score_label(concept, before, after), 1e-12)
    bound_data = log_term / max(pooled_kl(
        np.column_stack([reference.column(n) for n in INPUTS]),
        x_all[rows_before], x_all[rows_after],
    ), 1e-12)  # fmt: skip
    # the same bound as a detector built from the reference can know it: the shift in the
    # reference's normal scores, measured with the reference's covariance (the pooled
    # detector's), at the measured rate and at the target rate (1 per 1M, all signals)
    kl_reference = reference_kl(detectors_template, x_all[rows_before], x_all[rows_after])
    bound_data_reference = log_term / kl_reference
    bound_data_target = math.log(1e6 / fa_target) / kl_reference

    tp = throughput(data, reference)

    o50, o90 = quantiles(ours)
    a50, a90 = quantiles(adwin)
    d50, d90 = quantiles(ours_data)
    w50, w90 = quantiles(ours_warm)
    ad50, ad90 = quantiles(adwin_data)
    lines += [
        "## Drift detection (monitoring)",
        "",
        f"Streams recorded once from the local stack (the served production model on the "
        f"simulator's live traffic; `loadtests/record_drift_streams.py`), replayed {SEEDS} times "
        f"by a moving-block bootstrap (blocks of {BLOCK} events) with a change after "
        f"{CONCEPT_PRE:,} events. Concept: error rate {err_before:.3%} before, {err_after:.3%} "
        f"after `--concept-drift-at`. Data: `--data-drift-at` (amounts x2, more web). The "
        f"machine was shared with other engineers' work while this ran.",
        "",
        "| detection | detector | median delay | p90 delay | misses | vs ADWIN median | target |",
        "|---|---|---|---|---|---|---|",
        f"| concept (labelled events) | platform: CUSUM on log loss | {fmt(o50)} | {fmt(o90)} | "
        f"{ours_miss}/{SEEDS} | {ratio(o50, a50)} | <= 0.55 |",
        f"| concept (labelled events) | river ADWIN (defaults) on error bits | {fmt(a50)} | "
        f"{fmt(a90)} | {adwin_miss}/{SEEDS} | 1 | |",
        f"| concept (labelled events) | CUSUM bound, error bits | {fmt(bound_error_bits)} "
        "| | | | |",
        f"| concept (labelled events) | CUSUM bound, score decile x label | "
        f"{fmt(bound_score_label)} | | | | |",
        f"| data (events) | platform: per-input + pooled CUSUMs | {fmt(d50)} | {fmt(d90)} | "
        f"{ours_data_miss}/{SEEDS} | " + ratio(d50, ad50) + " | <= 0.5 of the fastest ADWIN |",
        f"| data (events) | platform, reference = first {warmup:,} live events | "
        f"{fmt(w50)} | {fmt(w90)} | {warm_miss}/{SEEDS} | "
        + ratio(w50, ad50)
        + " | <= 0.5 of the fastest ADWIN |",
        f"| data (events) | river ADWIN (defaults), fastest input | {fmt(ad50)} | {fmt(ad90)} | "
        f"{adwin_data_miss}/{max(SEEDS // 3, 5)} | 1 | |",
        f"| data (events) | CUSUM bound, pooled normal-score shift | {fmt(bound_data)} | | | | |",
        "| data (events) | CUSUM bound, the same shift with the reference's covariance "
        f"| {fmt(bound_data_reference)} | | | | |",
        "| data (events) | CUSUM bound with the reference's covariance at the target rate "
        f"({fa_target:g} per 1M) | {fmt(bound_data_target)} | | | "
        f"platform / bound: {ratio(d50, bound_data_target)} | <= 1.2 if the bound is above "
        "0.5 of the fastest ADWIN |",
        "",
        "First data signal to fire, per replay: "
        + ", ".join(f"{k} ({v})" for k, v in sorted(named.items(), key=lambda kv: -kv[1])),
        "",
        "| false alarms per 1M stationary events | platform, all signals "
        "| river ADWIN, all inputs + error bits | target |",
        "|---|---|---|---|",
        f"| reference = training data | {per_million:.2f} ({data_alarms} data/score + "
        f"{concept_alarms} concept on {STATIONARY_EVENTS:,} events each) | "
        f"{adwin_per_million:.0f} (on {ADWIN_STATIONARY:,}) | <= {fa_target:g} |",
        f"| reference = first live events | {warm_per_million:.2f} ({warm_alarms} data/score + "
        f"{concept_alarms} concept) | | <= {fa_target:g} |",
        "",
        "| monitoring throughput (one process) | value |",
        "|---|---|",
        "| records/s (predictions: production + shadow, and labels; decode, join, quality, "
        f"drift) | {tp['records_per_s']:,.0f} |",
        f"| CPU per record | {tp['cpu_us']:.1f} us |",
        "| serving's maximum (BENCHMARKS.md serving table) x 2 records (shadow mirrors all) "
        f"+ 1 label | {SERVING_MAX_RPS * 3:,} records/s |",
        f"| ratio | {tp['records_per_s'] / (SERVING_MAX_RPS * 3):.2f} (>= 1: keeps up) |",
        "",
        f"Bench wall time {time.perf_counter() - started:,.0f} s.",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fresh(template: DataDetectors) -> DataDetectors:
    """The same calibrated detectors, with every statistic at 0."""
    from services.monitoring.detectors import Cusum, Mcusum

    per_input = Cusum(
        template.per_input.columns, template.per_input.k, template.per_input.threshold
    )
    score = Cusum(template.score.columns, template.score.k, template.score.threshold)
    pooled = Mcusum(np.eye(1), template.pooled.k, template.pooled.threshold)
    pooled.whiten = template.pooled.whiten
    pooled.z_sum = np.zeros(template.pooled.z_sum.shape)
    pooled.raw_sum = np.zeros(template.pooled.raw_sum.shape)
    return DataDetectors(
        names=template.names,
        transform=template.transform,
        score_transform=template.score_transform,
        per_input=per_input,
        pooled=pooled,
        score=score,
        reference_means=template.reference_means,
        reference_score_mean=template.reference_score_mean,
        reference=template.reference,
        calibrations=template.calibrations,
    )


if __name__ == "__main__":
    main()

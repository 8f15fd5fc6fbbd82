"""``MonitorSettings``: windows, minimum sizes, alert limits, webhook and image archive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MonitorSettings:
    """How the monitor measures and when it alerts.

    Attributes:
        window_count: drift is measured on the latest this many predictions of the current model.
        window_days: and, when set, only on those of the last this many days.
        min_samples: fewer predictions in the window than this: no drift verdict ("insufficient data").
        min_reference: fewer reference cases than this: no verdict for that check.
        score_psi_limit: score drift alert above this population stability index (0.25: "major shift").
        intensity_psi_limit: input drift alert above this PSI of the mean intensity histogram.
        ks_alpha: drift alert when a two-sample Kolmogorov-Smirnov p-value falls below this.
        unseen_share_limit: acquisition drift alert when more than this share of the window has a value
            (manufacturer, view, spacing, size...) that the reference never had.
        performance_window: rolling performance over the latest this many confirmed cases.
        min_feedback: fewer confirmed cases than this: no performance verdict.
        n_bootstrap, confidence: the bootstrap of the rolling performance's CIs.
        check_every: ``record`` re-runs the checks (alerts, webhook) after this many predictions, in a
            background thread so that the prediction's answer never waits for them.
        cache_seconds: a Prometheus scrape reuses checks at most this old.
        webhook_url: alerts (raised and cleared) are POSTed here as JSON when set.
        archive_dir: when set, each image's pixels are kept here (16-bit PNG, no header) so that
            ``lungdx monitor challenge`` can score confirmed cases with a candidate model.
        archive_retention_days: archived images without feedback are deleted after this many days.
        log_queue_size: N, the most predictions accepted and not yet written to the database (the
            write-behind queue); a crash (SIGKILL, power cut) loses at most these. ``record`` waits
            while N are waiting.
        log_max_delay_s: T: ``record`` also waits while the oldest unwritten prediction is this old, so
            the predictions a crash loses were all recorded within one span of at most T seconds.
        log_block_s: how long ``record`` waits on a full queue before it refuses the prediction
            (``LogQueueFull``, a RuntimeError): no answer is given for a prediction that cannot be logged.
        log_batch_size: the most rows one transaction inserts.
        log_queue_mb: the most image data the queue holds, in MiB: copies for ``archive_dir``, and each
            record's statistics sample (at most 256 x 256 pixels, 0.25-0.5 MiB) until the writer reads it.
        close_timeout_s: ``close`` waits this long for the queue to be written.
    """

    window_count: int = 500
    window_days: float | None = None
    min_samples: int = 30
    min_reference: int = 10
    score_psi_limit: float = 0.25
    intensity_psi_limit: float = 0.25
    ks_alpha: float = 0.001
    unseen_share_limit: float = 0.2
    performance_window: int = 200
    min_feedback: int = 20
    n_bootstrap: int = 1000
    confidence: float = 0.95
    check_every: int = 25
    cache_seconds: float = 30.0
    webhook_url: str | None = None
    webhook_timeout_s: float = 5.0
    archive_dir: Path | None = None
    archive_retention_days: float = 30.0
    log_queue_size: int = 256
    log_max_delay_s: float = 5.0
    log_block_s: float = 10.0
    log_batch_size: int = 128
    log_queue_mb: float = 256.0
    close_timeout_s: float = 60.0

    def __post_init__(self):
        if self.window_count < 1 or self.performance_window < 1 or self.check_every < 1:
            raise ValueError("window_count, performance_window and check_every must be at least 1")
        if self.log_queue_size < 1 or self.log_batch_size < 1 or min(self.log_max_delay_s, self.log_block_s) <= 0:
            raise ValueError("log_queue_size and log_batch_size must be at least 1, log_max_delay_s and log_block_s positive")
        if not 0.0 < self.ks_alpha < 1.0 or not 0.0 <= self.unseen_share_limit <= 1.0:
            raise ValueError("ks_alpha must lie in (0, 1) and unseen_share_limit in [0, 1]")
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL; got {self.webhook_url!r}")

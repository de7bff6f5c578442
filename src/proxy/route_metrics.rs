//! Per-route request metrics, registered once so the request path does no
//! metric-registry lookups: `larder_requests_total{route,status}` and
//! `larder_request_duration_seconds{route}`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;

/// Statuses counted under their own label; others fall into their class.
const COMMON_STATUSES: [u16; 15] = [
    200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 413, 500, 502, 503, 504,
];
const STATUS_LABELS: [&str; 20] = [
    "200", "204", "206", "301", "302", "304", "400", "401", "403", "404", "413", "500", "502",
    "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// A route's label, its duration histogram and its request counters.
pub struct RouteMetrics {
    /// The `route` label: host + path prefix, `none` or `cachepump`.
    label: Arc<str>,
    duration: metrics::Histogram,
    /// One counter per entry of [`STATUS_LABELS`], registered on first use.
    requests: [OnceLock<metrics::Counter>; STATUS_LABELS.len()],
}

impl RouteMetrics {
    pub fn new(label: &str) -> Self {
        let label: Arc<str> = Arc::from(label);
        Self {
            duration: metrics::histogram!("larder_request_duration_seconds", "route" => label.clone()),
            label,
            requests: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Counts one answered request and how long its response head took.
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let index = status_index(status);
        self.requests[index]
            .get_or_init(|| {
                metrics::counter!(
                    "larder_requests_total",
                    "route" => self.label.clone(),
                    "status" => STATUS_LABELS[index]
                )
            })
            .increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

fn status_index(status: StatusCode) -> usize {
    let code = status.as_u16();
    if let Some(index) = COMMON_STATUSES.iter().position(|common| *common == code) {
        return index;
    }
    let class = match code {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    };
    COMMON_STATUSES.len() + class
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_own_label_or_their_class() {
        let label = |code: u16| {
            StatusCode::from_u16(code)
                .map(|status| STATUS_LABELS[status_index(status)])
                .unwrap_or("invalid")
        };
        assert_eq!(label(200), "200");
        assert_eq!(label(504), "504");
        assert_eq!(label(101), "1xx");
        assert_eq!(label(201), "2xx");
        assert_eq!(label(307), "3xx");
        assert_eq!(label(418), "4xx");
        assert_eq!(label(508), "5xx");
    }
}

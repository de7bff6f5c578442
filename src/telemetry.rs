//! Logging (tracing, text or JSON) and the Prometheus metrics recorder.
//!
//! Owns the process-wide subscriber and recorder; both are installed at most
//! once per process, because tests start many servers in one process. Must not
//! decide what is logged or counted: the modules that know the event do that.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Seconds: from a fast cache hit to a slow upstream.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global tracing subscriber: `level` is a level in any case
/// (`INFO`) or an EnvFilter directive (`larder=debug,hyper=warn`). A second
/// call in the same process is a no-op.
pub fn init(level: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_new(level.to_ascii_lowercase()).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (a second server in the same process): keep the first.
    drop(installed);
    metrics();
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes; without it they pile up in memory between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use together with
/// the thread that keeps its histograms bounded.
pub fn metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let handle = install_recorder();
        describe_proxy_metrics();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("larder-metrics-upkeep".to_string())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded on scrape only");
        }
        handle
    })
}

/// HELP lines for the metrics the proxy records; other modules describe theirs.
fn describe_proxy_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "larder_requests_total",
        "Requests answered on the proxy listener, by route and status."
    );
    describe_histogram!(
        "larder_request_duration_seconds",
        Unit::Seconds,
        "Time from request to response head on the proxy listener, by route."
    );
    describe_histogram!(
        "larder_upstream_duration_seconds",
        Unit::Seconds,
        "Time from sending to an upstream until its response head, by upstream."
    );
    describe_counter!(
        "larder_upstream_errors_total",
        "Failed upstream attempts, by upstream and kind (connect, timeout, reset)."
    );
}

fn install_recorder() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .unwrap_or_else(|_| PrometheusBuilder::new());
    match builder.install_recorder() {
        Ok(handle) => handle,
        Err(error) => {
            // Someone else owns the global recorder: render an empty one
            // rather than fail, and say so once.
            tracing::warn!(%error, "a metrics recorder was already installed; /metrics will be empty");
            PrometheusBuilder::new().build_recorder().handle()
        }
    }
}

/// The Prometheus text exposition of every Larder metric.
pub fn render_metrics() -> String {
    metrics().render()
}

/// One series of the Prometheus text: a counter's or gauge's value, or a
/// histogram's bucket (`le` among the labels, name ending in `_bucket`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Every series whose name starts with `prefix`, read back from the
/// exposition (what the console shows without counting anything twice).
pub fn samples(prefix: &str) -> Vec<Sample> {
    parse_exposition(&render_metrics(), prefix)
}

fn parse_exposition(text: &str, prefix: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(parse_sample)
        .collect()
}

/// `name{a="x",b="y \"q\""} 12.5` (labels optional).
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()?;
    let Some((name, labels)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_string(),
            labels: Vec::new(),
            value,
        });
    };
    let mut parsed = Vec::new();
    let mut rest = labels.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut label = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => label.push('\n'),
                    other => label.push(other),
                },
                (at, '"') => break at,
                (_, other) => label.push(other),
            }
        };
        parsed.push((key.trim_start_matches(',').to_string(), label));
        rest = after.get(end + 1..)?.trim_start_matches(',');
    }
    Some(Sample {
        name: name.to_string(),
        labels: parsed,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_parse_with_escaped_labels() {
        let text = "# HELP x y\nlarder_requests_total{route=\"a.test/\",status=\"200\"} 12\nlarder_x{v=\"q\\\"uote\"} 1.5\nlarder_bare 3\nother 1\n";
        let samples = parse_exposition(text, "larder_");
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("route"), Some("a.test/"));
        assert_eq!(samples[0].label("status"), Some("200"));
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(samples[1].label("v"), Some("q\"uote"));
        assert_eq!(samples[2].name, "larder_bare");
    }
}

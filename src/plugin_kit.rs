//! The plugin author's kit behind `larder plugin new` and `larder plugin
//! test`: a new plugin crate written from the template (with the guest SDK
//! and the WIT copied in, so it builds outside this repository), and one
//! hook of a built plugin run against a sample request and response, with
//! what it changed printed: an author's loop without a running proxy.
//!
//! Must not serve traffic or read a Larder config: it loads one plugin the
//! same way the proxy does and calls it the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;

use crate::config::{PluginConfig, PluginPhase, PluginTotals};
use crate::plugins::{FetchContext, FetchOutcome, PluginHost, RequestState, SourceValue};

/// What `larder plugin new` writes, besides the crate's own files.
const SDK_FILES: [(&str, &str); 7] = [
    (
        "larder-plugin/Cargo.toml",
        include_str!("../plugins/template/sdk-Cargo.toml"),
    ),
    (
        "larder-plugin/src/lib.rs",
        include_str!("../plugins/sdk/src/lib.rs"),
    ),
    (
        "larder-plugin/src/alloc_support.rs",
        include_str!("../plugins/sdk/src/alloc_support.rs"),
    ),
    (
        "larder-plugin/src/global.rs",
        include_str!("../plugins/sdk/src/global.rs"),
    ),
    (
        "larder-plugin/wit/plugin.wit",
        include_str!("../wit/plugin.wit"),
    ),
    (
        "larder-plugin/wit/0.1.0/plugin.wit",
        include_str!("../wit/0.1.0/plugin.wit"),
    ),
    (
        ".cargo/config.toml",
        include_str!("../plugins/template/cargo-config.toml"),
    ),
];
const CARGO_TOML: &str = include_str!("../plugins/template/Cargo.toml.in");
const TRANSFORMER: &str = include_str!("../plugins/template/transformer.rs.in");
const FETCHER: &str = include_str!("../plugins/template/fetcher.rs.in");

/// The two kinds of plugin a template exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PluginKind {
    Transformer,
    Fetcher,
}

/// Writes a new plugin crate into `dir` (which must not exist yet) and
/// returns what to do next.
pub fn new_plugin(dir: &Path, kind: PluginKind) -> anyhow::Result<String> {
    let name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .context("the plugin needs a directory name")?;
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!("`{name}` is not a crate name: use lower-case letters, digits, - and _");
    }
    if dir.exists() {
        bail!("{} exists already; pick a new name", dir.display());
    }
    let crate_name = name.replace('-', "_");
    let fill = |text: &str| text.replace("@NAME@", name).replace("@CRATE@", &crate_name);
    let source = match kind {
        PluginKind::Transformer => TRANSFORMER,
        PluginKind::Fetcher => FETCHER,
    };
    let mut files: Vec<(String, String)> = vec![
        ("Cargo.toml".to_string(), fill(CARGO_TOML)),
        ("src/lib.rs".to_string(), fill(source)),
    ];
    files.extend(
        SDK_FILES
            .iter()
            .map(|(path, text)| (path.to_string(), text.to_string())),
    );
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let wasm = format!("target/wasm32-wasip2/release/{crate_name}.wasm");
    let try_it = match kind {
        PluginKind::Transformer => format!("larder plugin test {wasm} --config value=hello"),
        PluginKind::Fetcher => format!(
            "larder plugin test {wasm} --config url=http://127.0.0.1:8080/ --allow-host http://127.0.0.1:8080"
        ),
    };
    Ok(format!(
        "wrote {dir} ({kind:?} on larder:plugin@{version}, with the guest SDK)\n\
         next:\n  rustup target add wasm32-wasip2\n  cd {dir} && cargo build --release\n  {try_it}",
        dir = dir.display(),
        version = if kind == PluginKind::Transformer {
            "0.2.0"
        } else {
            "0.1.0"
        },
    ))
}

/// A sample exchange for `larder plugin test`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub config: Vec<(String, String)>,
    pub phase: PluginPhase,
    /// `METHOD /path?query`.
    pub request_line: String,
    pub request_headers: Vec<(String, String)>,
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    pub body: Bytes,
    pub allow_hosts: Vec<String>,
}

/// Loads the plugin at `path` as the proxy would and runs its hooks (a
/// transformer) or one run (a fetcher) on `sample`; returns the report and
/// whether every call succeeded.
pub async fn test_plugin(path: &Path, sample: &Sample) -> anyhow::Result<(String, bool)> {
    let name = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("plugin")
        .to_string();
    let config = plugin_config(path, sample)?;
    let host = PluginHost::load(
        &BTreeMap::from([(name.clone(), config)]),
        &PluginTotals::default(),
    )
    .await
    .map_err(|error| anyhow::anyhow!("{}", error.reason))?;
    let stats = host.stats(&name).context("the plugin did not load")?;
    let mut report = format!(
        "{}: {}, larder:plugin@{}, {} calls; hooks: {}\n",
        path.display(),
        stats.kind,
        stats.wit,
        stats.calls,
        stats.hooks.join(", ")
    );
    let ok = if stats.kind == "fetcher" {
        run_fetcher(&host, &name, &mut report).await
    } else {
        run_transformer(&host, &name, sample, &mut report).await?
    };
    Ok((report, ok))
}

fn plugin_config(path: &Path, sample: &Sample) -> anyhow::Result<PluginConfig> {
    let mut yaml = serde_yaml::Mapping::new();
    yaml.insert("path".into(), path.display().to_string().into());
    let config: serde_yaml::Mapping = sample
        .config
        .iter()
        .map(|(key, value)| (key.as_str().into(), value.as_str().into()))
        .collect();
    yaml.insert("config".into(), config.into());
    yaml.insert(
        "phase".into(),
        match sample.phase {
            PluginPhase::Downstream => "downstream",
            PluginPhase::CacheStore => "cache_store",
        }
        .into(),
    );
    yaml.insert("on_error".into(), "closed".into());
    let hosts: Vec<serde_yaml::Value> = sample
        .allow_hosts
        .iter()
        .map(|host| host.as_str().into())
        .collect();
    yaml.insert("allow_hosts".into(), hosts.into());
    serde_yaml::from_value(yaml.into()).context("building the plugin's settings")
}

fn header_map(pairs: &[(String, String)]) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let header = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("`{name}` is not a header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("`{value}` is not a header value"))?;
        map.append(header, value);
    }
    Ok(map)
}

fn sample_request(sample: &Sample) -> anyhow::Result<http::request::Parts> {
    let (method, target) = sample
        .request_line
        .split_once(' ')
        .unwrap_or(("GET", sample.request_line.as_str()));
    let method = Method::from_bytes(method.trim().as_bytes())
        .with_context(|| format!("`{method}` is not a method"))?;
    let mut request = Request::builder()
        .method(method)
        .uri(target.trim())
        .body(())
        .with_context(|| format!("`{target}` is not a request target"))?;
    *request.headers_mut() = header_map(&sample.request_headers)?;
    if !request.headers().contains_key(http::header::HOST) {
        request
            .headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("example.test"));
    }
    Ok(request.into_parts().0)
}

async fn run_transformer(
    host: &PluginHost,
    name: &str,
    sample: &Sample,
    report: &mut String,
) -> anyhow::Result<bool> {
    let chain = [name.to_string()];
    let mut request = sample_request(sample)?;
    let before = request.clone();
    let mut state = RequestState::default();
    if sample.phase == PluginPhase::Downstream {
        match host
            .on_request(&chain, &mut request, &mut state, false)
            .await
        {
            Err(error) => {
                write_failure(report, "on-request", &error);
                return Ok(false);
            }
            Ok(Some(answer)) => {
                let (parts, body) = answer.into_parts();
                let body = collect(body).await;
                let _ = writeln!(report, "on-request: answered {}", parts.status.as_u16());
                diff_headers(report, &HeaderMap::new(), &parts.headers);
                write_body(report, &body);
                return Ok(true);
            }
            Ok(None) => {
                let _ = writeln!(
                    report,
                    "on-request: {} {} -> {} {}",
                    before.method, before.uri, request.method, request.uri
                );
                diff_headers(report, &before.headers, &request.headers);
                if !state.cache_key_extra.is_empty() {
                    let _ = writeln!(report, "  cache key + {:?}", state.cache_key_extra);
                }
            }
        }
    }
    let headers = header_map(&sample.response_headers)?;
    let status = StatusCode::from_u16(sample.status)
        .with_context(|| format!("{} is not a status", sample.status))?;
    let mut response = Response::new(crate::http::body::full(sample.body.clone()));
    *response.status_mut() = status;
    *response.headers_mut() = headers.clone();
    let phase = sample.phase;
    match host
        .on_response(&chain, phase, &request, response, Some(&mut state))
        .await
    {
        Err(error) => {
            write_failure(report, "on-response", &error);
            Ok(false)
        }
        Ok(out) => {
            let label = match phase {
                PluginPhase::Downstream => "downstream",
                PluginPhase::CacheStore => "cache-store",
            };
            let _ = write!(report, "on-response ({label}): ");
            describe_response(report, status, &headers, &sample.body, out).await;
            Ok(true)
        }
    }
}

async fn describe_response(
    report: &mut String,
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    out: Response<crate::http::body::Body>,
) {
    let (parts, new_body) = out.into_parts();
    let new_body = collect(new_body).await;
    let _ = writeln!(report, "{} -> {}", status.as_u16(), parts.status.as_u16());
    diff_headers(report, headers, &parts.headers);
    if new_body == *body {
        let _ = writeln!(report, "  body unchanged ({} bytes)", body.len());
    } else {
        write_body(report, &new_body);
    }
}

/// The whole body (a sample's: in memory already).
async fn collect(body: crate::http::body::Body) -> Bytes {
    body.collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default()
}

/// `HOOK: FAILED (kind): detail`, as the proxy would log it.
fn write_failure(report: &mut String, hook: &str, error: &crate::plugins::PluginError) {
    let _ = writeln!(
        report,
        "{hook}: FAILED ({}): {}",
        error.kind.as_str(),
        error.detail
    );
}

/// The body's size and its first 400 bytes.
fn write_body(report: &mut String, body: &Bytes) {
    let shown = String::from_utf8_lossy(&body[..body.len().min(400)]);
    let _ = writeln!(
        report,
        "  body ({} bytes): {}",
        body.len(),
        shown.trim_end()
    );
}

/// `+ name: value` for fields added, `- name: value` for fields removed.
fn diff_headers(report: &mut String, before: &HeaderMap, after: &HeaderMap) {
    let lines = |map: &HeaderMap| -> Vec<String> {
        map.iter()
            .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
            .collect()
    };
    let (old, new) = (lines(before), lines(after));
    for line in old.iter().filter(|line| !new.contains(line)) {
        let _ = writeln!(report, "  - {line}");
    }
    for line in new.iter().filter(|line| !old.contains(line)) {
        let _ = writeln!(report, "  + {line}");
    }
}

struct NoValues;

impl crate::plugins::SourceValues for NoValues {
    fn get(&self, _source: &str) -> Option<SourceValue> {
        None
    }
}

async fn run_fetcher(host: &PluginHost, name: &str, report: &mut String) -> bool {
    let context = FetchContext {
        source: "sample".to_string(),
        scheduled_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
        previous_etag: None,
        config: BTreeMap::new(),
    };
    match host.fetch(name, context, Arc::new(NoValues)).await {
        Ok(FetchOutcome::NotModified) => {
            let _ = writeln!(report, "run: not modified");
            true
        }
        Ok(FetchOutcome::Updated {
            content_type,
            body,
            headers,
        }) => {
            let _ = writeln!(
                report,
                "run: updated, {} bytes{}",
                body.len(),
                content_type.map_or(String::new(), |t| format!(" of {t}"))
            );
            for (header, value) in headers {
                let _ = writeln!(report, "  {header}: {}", String::from_utf8_lossy(&value));
            }
            let _ = writeln!(
                report,
                "  {}",
                String::from_utf8_lossy(&body[..body.len().min(400)])
            );
            true
        }
        Err(error) => {
            write_failure(report, "run", &error);
            false
        }
    }
}

/// `KEY=VALUE`.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.trim().to_string(), value.to_string()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

/// `Name: value`.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once(':')
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| format!("`{text}` is not `Name: value`"))
}

/// Where `larder plugin new NAME` writes: `./NAME`.
pub fn target_dir(name: &str) -> PathBuf {
    PathBuf::from(name)
}

//! The `larder` command: parse flags, load the config, then either check it
//! (`larder check`) or run the server until a signal.
//!
//! Holds no logic beyond parsing and wiring: config rules live in
//! `larder::config`, serving in `larder::app`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use larder::config::{self, Config, ConfigErrors, LogFormat};

const EXAMPLES: &str = "\
Examples:
  larder -c config.yml
      run with config.yml
  larder -c config.yml -e :8080 -l debug
      the same, overriding the listen address and the log level
  larder check -c config.yml
      validate the file and compile its plugins, like `nginx -t`
  larder schema > config.schema.json
      the config's JSON Schema, for editors (docs/config.md says how)
  larder plugin new my-plugin --kind transformer
      write a new plugin crate into ./my-plugin (docs in plugins/README.md)
  larder plugin test my-plugin/target/wasm32-wasip2/release/my_plugin.wasm --config value=hi
      run its hooks on a sample request and response, print what changed

cachepump's command line works unchanged:
  larder -e '0.0.0.0:8080' -l 'INFO' -c './config.yml'

The config reference is docs/config.md.";

#[derive(Debug, Parser)]
#[command(name = "larder", version, about, after_help = EXAMPLES)]
struct Cli {
    /// The YAML config file.
    #[arg(
        short = 'c',
        long = "config",
        alias = "c",
        value_name = "FILE",
        default_value = "./config.yml"
    )]
    config: PathBuf,

    /// The proxy's listen address, `HOST:PORT` or `:PORT`; overrides `listen` in the file.
    #[arg(short = 'e', long = "listen", alias = "e", value_name = "ADDR", value_parser = parse_listen_flag, global = true)]
    listen: Option<SocketAddr>,

    /// Log level (trace, debug, info, warn, error; any case) or a directive such as
    /// `larder=debug`; overrides `log.level` in the file.
    #[arg(short = 'l', long = "log-level", alias = "l", value_name = "LEVEL", value_parser = parse_level_flag, global = true)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config file and compile its plugins, print what would run,
    /// and exit 0; or print every error and exit 1.
    Check {
        /// The YAML config file (as `larder -c FILE check`).
        #[arg(short = 'c', long = "config", alias = "c", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write and try plugins (needs no config file).
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the config file's JSON Schema (draft 2020-12) and exit; needs
    /// no config file.
    Schema,
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate into ./NAME: the template, the guest SDK and
    /// the WIT, building on its own with `cargo build --release`.
    New {
        /// The crate's name and directory.
        name: String,
        #[arg(long, value_enum, default_value = "transformer")]
        kind: larder::plugin_kit::PluginKind,
    },
    /// Load a built plugin as the proxy would and run its hooks (a
    /// transformer) or one run (a fetcher) on a sample; print what changed.
    /// Exits 1 if a call fails.
    Test {
        /// The plugin's .wasm file.
        path: PathBuf,
        /// A config entry handed to `init` (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = larder::plugin_kit::parse_pair)]
        config: Vec<(String, String)>,
        /// The transformer's phase.
        #[arg(long, value_enum, default_value = "downstream")]
        phase: PhaseArg,
        /// The sample request line.
        #[arg(long, value_name = "METHOD /PATH", default_value = "GET /")]
        request: String,
        /// A request header (repeatable).
        #[arg(long = "header", value_name = "NAME: VALUE", value_parser = larder::plugin_kit::parse_header)]
        headers: Vec<(String, String)>,
        /// The sample response's status.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// A response header (repeatable).
        #[arg(long = "response-header", value_name = "NAME: VALUE", value_parser = larder::plugin_kit::parse_header)]
        response_headers: Vec<(String, String)>,
        /// The sample response body.
        #[arg(long, default_value = "")]
        body: String,
        /// An origin a fetcher's http-client may reach (repeatable).
        #[arg(long = "allow-host", value_name = "URL")]
        allow_hosts: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PhaseArg {
    Downstream,
    CacheStore,
}

fn parse_listen_flag(text: &str) -> Result<SocketAddr, String> {
    config::parse_listen(text)
}

fn parse_level_flag(text: &str) -> Result<String, String> {
    config::log_directive(text)
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(Command::Check { config: Some(path) }) = &cli.command {
        cli.config = path.clone();
    }
    if let Some(Command::Schema) = cli.command {
        let schema = config::json_schema();
        // A reader that stops early (`| head`) is not an error worth a panic.
        let _ = writeln!(std::io::stdout(), "{schema:#}");
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Plugin(command)) = cli.command {
        return match plugin_command(command) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("larder: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut config = match config::load_file(&cli.config) {
        Ok(config) => config,
        Err(errors) => return report_config_errors(&cli.config, &errors),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(level) = cli.log_level.clone() {
        config.log.level = level;
    }
    let outcome = match cli.command {
        Some(Command::Check { .. }) => check(&cli.config, config),
        Some(Command::Plugin(_) | Command::Schema) | None => run(&cli.config, config),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("larder: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `larder plugin new` and `larder plugin test`.
fn plugin_command(command: PluginCommand) -> anyhow::Result<ExitCode> {
    use larder::plugin_kit;
    match command {
        PluginCommand::New { name, kind } => {
            let next = plugin_kit::new_plugin(&plugin_kit::target_dir(&name), kind)?;
            let _ = writeln!(std::io::stdout(), "{next}");
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test {
            path,
            config,
            phase,
            request,
            headers,
            status,
            response_headers,
            body,
            allow_hosts,
        } => {
            let sample = plugin_kit::Sample {
                config,
                phase: match phase {
                    PhaseArg::Downstream => config::PluginPhase::Downstream,
                    PhaseArg::CacheStore => config::PluginPhase::CacheStore,
                },
                request_line: request,
                request_headers: headers,
                status,
                response_headers,
                body: body.into(),
                allow_hosts,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let (report, ok) = runtime.block_on(plugin_kit::test_plugin(&path, &sample))?;
            let _ = write!(std::io::stdout(), "{report}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn report_config_errors(path: &Path, errors: &ConfigErrors) -> ExitCode {
    for error in &errors.0 {
        eprintln!("{error}");
    }
    eprintln!(
        "larder: {} has {}; nothing was started",
        path.display(),
        count(errors.0.len(), "error")
    );
    ExitCode::FAILURE
}

/// `larder check`: the file is valid and every plugin compiles and initialises.
fn check(path: &Path, config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loaded = runtime.block_on(larder::plugins::PluginHost::load(
        &config.plugins,
        &config.plugin_limits,
    ));
    if let Err(error) = loaded {
        let at = format!("plugins.{}", error.plugin);
        let error = config::error_at(path, &at, error.reason.to_string());
        return Ok(report_config_errors(path, &ConfigErrors(vec![error])));
    }
    for warning in config::warnings(path, &config) {
        eprintln!("warning: {warning}");
    }
    // A reader that went away (`larder check | head`) is not an error.
    let _ = writeln!(std::io::stdout(), "{}", summary(path, &config));
    Ok(ExitCode::SUCCESS)
}

/// What `check` prints: what Larder would run with this file.
fn summary(path: &Path, config: &Config) -> String {
    let names = |keys: Vec<&String>| -> String {
        if keys.is_empty() {
            String::new()
        } else {
            let keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
            format!(" ({})", keys.join(", "))
        }
    };
    let mode = match &config.routes {
        Some(routes) => format!("proxy, {}", count(routes.len(), "route")),
        None => "cachepump mode: /?key=NAME and /health".to_string(),
    };
    let admin = match &config.admin {
        Some(admin) if admin.token.is_some() => format!("{} (token set)", admin.listen),
        Some(admin) => format!("{} (no token: only /health and /ready)", admin.listen),
        None => "off".to_string(),
    };
    let routes = config.routes.as_ref().map_or(0, Vec::len);
    [
        format!("{}: ok", path.display()),
        format!("  listen     {} ({mode})", config.listen),
        format!("  admin      {admin}"),
        format!(
            "  log        {} ({})",
            config.log.level,
            match config.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        ),
        format!(
            "  cache      {} (objects up to {})",
            config.cache.max_size, config.cache.max_object_size
        ),
        format!(
            "  upstreams  {}{}",
            config.upstreams.len(),
            names(config.upstreams.keys().collect())
        ),
        format!("  routes     {routes}"),
        format!(
            "  sources    {}{}",
            config.sources.len(),
            names(config.sources.keys().collect())
        ),
        format!(
            "  plugins    {}{}{}",
            config.plugins.len(),
            names(config.plugins.keys().collect()),
            if config.plugins.is_empty() {
                ""
            } else {
                ", all compiled"
            }
        ),
    ]
    .join("\n")
}

/// `1 route`, `3 routes`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs the server until SIGINT/SIGTERM.
fn run(path: &Path, config: Config) -> anyhow::Result<ExitCode> {
    larder::telemetry::init(&config.log.level, config.log.format);
    for warning in config::warnings(path, &config) {
        tracing::warn!(%warning, "config warning");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let options = larder::app::Options {
            config_path: Some(path.to_path_buf()),
            ..Default::default()
        };
        let server = match larder::app::start(config, options).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "larder did not start");
                eprintln!("larder: cannot start: {error}");
                return Ok(ExitCode::FAILURE);
            }
        };
        server.run_until_signal().await?;
        Ok(ExitCode::SUCCESS)
    })
}

//! `turnpike`: parse the command line, load the configuration, start the services.
#![allow(
    clippy::print_stdout,
    reason = "a CLI prints its results and readiness to stdout"
)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod services;

/// Exit code for a bad configuration or command line (sysexits.h `EX_USAGE`).
const EXIT_USAGE: u8 = 64;
/// Exit status after a second SIGTERM or Ctrl-C cut a drain short: not a clean stop.
const EXIT_FORCED: u8 = 1;

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "TURN/STUN media relay with a control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process: the relay, the control plane and signaling (when the
    /// configuration has a [control] section; signaling is served on the control listener at
    /// /v1/signal) and the admin listener. Without --config, runs a local relay on
    /// 127.0.0.1:3478 and the API on 127.0.0.1:8080 with generated secrets, printed once.
    Serve {
        /// TOML configuration file (also: TURNPIKE_CONFIG).
        #[arg(long, env = "TURNPIKE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the TURN relay only (and the admin listener).
    Relay {
        /// TOML configuration file (also: TURNPIKE_CONFIG).
        #[arg(long, env = "TURNPIKE_CONFIG")]
        config: PathBuf,
    },
    /// Run the control plane's HTTP API only (and the admin listener); it mints credentials for
    /// relays that share its `relay.secrets`.
    Control {
        /// TOML configuration file (also: TURNPIKE_CONFIG).
        #[arg(long, env = "TURNPIKE_CONFIG")]
        config: PathBuf,
    },
    /// Run WebSocket signaling only (and the admin listener) on `[signal] listen`; it needs the
    /// `control` section's keys and the `store` the control plane uses.
    Signal {
        /// TOML configuration file (also: TURNPIKE_CONFIG).
        #[arg(long, env = "TURNPIKE_CONFIG")]
        config: PathBuf,
    },
    /// Print a time-limited TURN username and password (coturn REST format).
    Creds {
        /// The user part of the username (counts towards the per-user quota).
        #[arg(long)]
        user: String,
        /// How long the credential may be used to allocate, like "10m" or "1h".
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The shared secret.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        secret: Option<String>,
        /// Take the signing (first) secret from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit (64 when it is bad).
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnpike: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_overrides() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(conf::ENV_PREFIX))
        .collect()
}

/// Loads the configuration, printing every error and returning `None` when it is bad.
fn load(path: Option<&std::path::Path>) -> Option<conf::Config> {
    match conf::load(path, &env_overrides()) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("turnpike: invalid configuration:");
            for e in &errors.0 {
                eprintln!("  {}: {}", e.path, e.message);
            }
            None
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig { config } => match load(Some(&config)) {
            Some(_) => {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            }
            None => Ok(ExitCode::from(EXIT_USAGE)),
        },
        Command::Creds {
            user,
            ttl,
            secret,
            config,
        } => {
            let secret = match (secret, config) {
                (Some(s), _) => s,
                (None, Some(path)) => match load(Some(&path)) {
                    Some(c) => match c.relay.secrets.first() {
                        Some(s) => s.expose().to_owned(),
                        None => anyhow::bail!("{} has no secrets", path.display()),
                    },
                    None => return Ok(ExitCode::from(EXIT_USAGE)),
                },
                (None, None) => anyhow::bail!("give --secret or --config"),
            };
            let expiry = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("system clock before 1970")?
                .saturating_add(ttl)
                .as_secs();
            let (username, password) =
                relay_proto::rest_credentials(secret.as_bytes(), &user, expiry);
            println!("username: {username}");
            println!("password: {password}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config } => serve(
            config.as_deref(),
            services::Which {
                relay: true,
                control: true,
                signal: true,
            },
        ),
        Command::Relay { config } => serve(
            Some(&config),
            services::Which {
                relay: true,
                control: false,
                signal: false,
            },
        ),
        Command::Control { config } => serve(
            Some(&config),
            services::Which {
                relay: false,
                control: true,
                signal: false,
            },
        ),
        Command::Signal { config } => serve(
            Some(&config),
            services::Which {
                relay: false,
                control: false,
                signal: true,
            },
        ),
    }
}

fn serve(path: Option<&std::path::Path>, mut which: services::Which) -> anyhow::Result<ExitCode> {
    let Some(config) = load(path) else {
        return Ok(ExitCode::from(EXIT_USAGE));
    };
    init_logging(&config.log.level);
    if (which.control || which.signal) && config.control.is_none() {
        if which.relay {
            // `serve` runs what the configuration describes: a relay-only file runs the relay.
            which.control = false;
            which.signal = false;
        } else {
            eprintln!("turnpike: the configuration has no [control] section");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    print_generated(&config);
    if which.relay {
        raise_open_file_limit(config.relay.relay_ports.len());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Taken before anything is announced, so a SIGTERM right after start-up drains too.
    let signals = {
        let _runtime = rt.enter();
        Termination::listen()
    };
    rt.block_on(services::run(config, which, shutdown_signal(signals)))?;
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft limit on open files to the hard limit, as coturn and Go's runtime do: every
/// allocation holds a relay socket (two for a dual one) and every TCP/TLS client a connection,
/// and the usual soft default of 1024 would cap a relay near a thousand allocations, past which
/// every bind fails and every Allocate gets 508. Logs what it did, and warns when the limit is
/// below the relay port range (`ports`), the most allocations the relay could otherwise hold.
fn raise_open_file_limit(ports: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    // The kernel refuses an unlimited soft limit on files; its usual per-process maximum.
    const NR_OPEN: u64 = 1 << 20;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "cannot read the open-file limit"),
    };
    let target = if hard == RLIM_INFINITY { NR_OPEN } else { hard };
    let limit = if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = target, "raised the open-file limit");
                target
            }
            Err(e) => {
                tracing::warn!(error = %e, limit = soft, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    if limit < u64::from(ports) {
        tracing::warn!(
            limit,
            ports,
            "the open-file limit is below the relay port range: allocations past it get 508 \
             (raise the hard limit, e.g. LimitNOFILE= in the systemd unit)"
        );
    }
}

/// Shows the secrets the embedded default generated, once, to whoever started the process
/// (stdout, never the log): they exist nowhere else.
fn print_generated(config: &conf::Config) {
    if !config.is_embedded() {
        return;
    }
    println!("turnpike: no --config: running the embedded local default");
    let g = config.generated;
    if g.relay_secret {
        if let Some(secret) = config.relay.secrets.first() {
            println!("turnpike: secret for this run: {}", secret.expose());
            println!(
                "turnpike: get a credential with: turnpike creds --user alice --ttl 1h --secret {}",
                secret.expose()
            );
        }
    }
    if let Some(c) = config.control.as_ref() {
        if let (true, Some(token)) = (g.admin_token, c.admin_token.as_ref()) {
            println!("turnpike: admin token for this run: {}", token.expose());
        }
    }
    if let Some(app) = config.generated_app() {
        if let Some(key) = app.keys.first() {
            println!(
                "turnpike: app \"{}\" key for this run: {}",
                app.id,
                key.expose()
            );
        }
    }
}

/// SIGHUP, taken at startup on every command, before anything is announced: its default action
/// ends the process, and a fleet-wide "reload your certificates" HUP must not stop nodes without
/// TLS. The relay's TLS certificate and key are reloaded on each (existing connections keep
/// their session); without TLS the signal is only logged.
pub(crate) struct Sighup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Sighup {
    /// Takes SIGHUP over from its default action (needs the runtime).
    pub(crate) fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP"))
                .ok();
            Self { signal }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Handles every SIGHUP from now on: reloads `tls` when there is one.
    pub(crate) async fn serve(self, tls: Option<relay_server::TlsHandle>) {
        #[cfg(unix)]
        {
            let Some(mut hup) = self.signal else { return };
            while hup.recv().await.is_some() {
                let Some(tls) = &tls else {
                    tracing::info!("SIGHUP: no TLS certificate to reload");
                    continue;
                };
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the old certificate")
                    }
                }
            }
        }
        #[cfg(not(unix))]
        drop((self, tls));
    }
}

/// SIGTERM and Ctrl-C (SIGINT), registered when made: a signal that comes after
/// [`Termination::listen`] is never missed, even before the first [`Termination::recv`]. Made
/// within the runtime.
struct Termination {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Termination {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            // A signal that cannot be taken keeps its default action, which ends the process.
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the next SIGTERM or Ctrl-C.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Completes on the first SIGTERM or Ctrl-C, which starts the drain. A second one while the
/// services stop ends the process at once with [`EXIT_FORCED`]: whoever asks twice does not want
/// to wait out `relay.grace-period`, and an exit leaves nothing behind that a drain would close
/// more politely (the kernel closes every socket; TURN has no message to tell clients).
async fn shutdown_signal(mut first: Termination) {
    first.recv().await;
    // Listening again before the drain is announced: a second signal is never lost.
    let mut second = Termination::listen();
    tracing::info!("shutdown requested: draining (a second SIGTERM or Ctrl-C stops at once)");
    tokio::spawn(async move {
        second.recv().await;
        tracing::warn!("second shutdown signal: exiting without draining");
        std::process::exit(EXIT_FORCED.into());
    });
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

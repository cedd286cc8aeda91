//! The `herald` binary: flags and environment to [`herald::Config`], logging, signals.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use herald::Config;
use tokio::net::{TcpListener, TcpSocket};

/// Herald: a lean real-time notification server. Backends publish over HTTP, clients receive
/// over WebSocket. Every flag can also be set from the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Registry shards, each with its own writer task [default: number of CPUs].
    #[arg(long, env = "HERALD_SHARDS")]
    shards: Option<usize>,
    /// Frames queued per connection before it is dropped as a slow consumer.
    #[arg(long, env = "HERALD_QUEUE_CAPACITY", default_value_t = 1024)]
    queue_capacity: usize,
    /// Largest publish body and client message, in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    max_message_bytes: usize,
    /// Open connections above which new ones get 503.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Channels one connection may subscribe to.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    max_subscriptions: usize,
    /// Time a new connection has to send its request headers (e.g. 10s, 500ms).
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// How often quiet WebSocket clients are pinged.
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// A WebSocket client silent for this long is closed.
    #[arg(long, env = "HERALD_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Publishes per second one WebSocket client may make (bursts of as many; 0: no limit).
    #[arg(long, env = "HERALD_CLIENT_PUBLISH_RATE", default_value_t = 50)]
    client_publish_rate: u32,
    /// Key that authorizes publish API requests (`Authorization: Bearer <key>`); repeat the
    /// flag (or separate with commas in the variable) for several. Without one, /api/* answers
    /// loopback clients only.
    #[arg(
        long = "api-key",
        env = "HERALD_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Browser origins allowed to open WebSockets, comma-separated (`*`: any). Default: only
    /// pages from the same host, and clients that send no Origin.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Redis URL (redis://host:port/): cluster mode, channels shared with every node on the
    /// same Redis. Without it, the embedded in-memory broker.
    #[arg(long, env = "HERALD_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// The longest one Redis call may take before it counts as failed.
    #[arg(long, env = "HERALD_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    redis_timeout: Duration,
    /// On SIGINT/SIGTERM, how long connections get to close before the server exits.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

impl Cli {
    fn config(&self) -> Config {
        let defaults = Config::default();
        defaults
            .clone()
            .shards(self.shards.unwrap_or(defaults.shards))
            .queue_capacity(self.queue_capacity)
            .max_message_bytes(self.max_message_bytes)
            .max_connections(self.max_connections)
            .max_subscriptions(self.max_subscriptions)
            .handshake_timeout(self.handshake_timeout)
            .ping_interval(self.ping_interval)
            .idle_timeout(self.idle_timeout)
            .shutdown_grace(self.shutdown_grace)
            .client_publish_rate(self.client_publish_rate)
            .api_keys(self.api_keys.clone())
            .allowed_origins(self.allowed_origins.clone())
            .redis(self.redis.clone())
            .redis_timeout(self.redis_timeout)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Its default reports a failed log write with `eprintln!`, which panics when stderr is
        // gone (a closed pipe): a server must outlive its log reader.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = cli.config();
    if let Err(err) = config.validate() {
        report(format_args!("{err}"));
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            report(format_args!("cannot start the runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match listen(cli.listen) {
            Ok(listener) => listener,
            Err(err) => {
                report(format_args!("cannot listen on {}: {err}", cli.listen));
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map_or(cli.listen, |addr| addr);
        tracing::info!(
            %addr,
            shards = config.shards,
            "herald listening: demo at http://{addr}/, WebSocket at ws://{addr}/ws"
        );
        match herald::server::run(listener, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                report(format_args!("{err}"));
                ExitCode::FAILURE
            }
        }
    })
}

/// Connections the kernel queues for `accept` (the listen backlog). Tokio's default of 128
/// overflows when hundreds of clients reconnect at once (after a deploy, say), and each
/// overflow costs the client a one-second SYN retransmit.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Prints a start-up error to stderr, ignoring a stderr that is gone.
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "herald: {message}");
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

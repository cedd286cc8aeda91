//! The `herald` binary: flags and environment to [`herald::Config`], logging, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herald::Config;
use herald::auth::TokenRequest;
use jsonwebtoken::Algorithm;
use tokio::net::{TcpListener, TcpSocket};

/// Herald: a lean real-time notification server. Backends publish over HTTP, clients receive
/// over WebSocket. Every flag can also be set from the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// What to do instead of serving.
#[derive(Debug, Subcommand)]
enum Command {
    /// Print a client token signed with the JWT secret (for the demo page, scripts, tests).
    Token(TokenArgs),
}

/// `herald token`: the claims of the token to mint.
#[derive(Debug, Args)]
struct TokenArgs {
    /// The secret the server verifies tokens with (its --jwt-secret).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The client id (`sub`).
    #[arg(long)]
    sub: String,
    /// Channel patterns the client may subscribe to, comma-separated (`news`, `user:42:*`, `*`).
    #[arg(long, value_delimiter = ',', value_parser = list_item)]
    channels: Vec<String>,
    /// Channel patterns the client may publish to from its socket.
    #[arg(long, value_delimiter = ',', value_parser = list_item)]
    publish: Vec<String>,
    /// Client-id patterns the client may send direct messages to.
    #[arg(long, value_delimiter = ',', value_parser = list_item)]
    send: Vec<String>,
    /// How long the token is valid (e.g. 1h, 15m).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// HMAC algorithm.
    #[arg(long, default_value = "hs256")]
    alg: HmacAlgorithm,
    /// `iss` claim (when the server has --jwt-issuer).
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    issuer: Option<String>,
    /// `aud` claim (when the server has --jwt-audience).
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    audience: Option<String>,
}

/// The algorithms `herald token` signs with.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum HmacAlgorithm {
    Hs256,
    Hs384,
    Hs512,
}

/// Serving: every limit and key.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on: IP:PORT or HOST:PORT (a host name is resolved once, at start-up),
    /// e.g. 127.0.0.1:8080, 0.0.0.0:8080, localhost:8080, [::1]:8080.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080", value_parser = listen_address)]
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
    /// Key that authorizes /api/* and /metrics requests (`Authorization: Bearer <key>`); repeat
    /// the flag or separate keys with commas for several. Without one, /api/* and /metrics
    /// answer only clients on this machine that do not come through a proxy.
    #[arg(
        long = "api-key",
        env = "HERALD_API_KEY",
        value_delimiter = ',',
        value_parser = list_item,
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Serve /metrics to anyone, without an API key (for a scraper that cannot send one).
    #[arg(long, env = "HERALD_PUBLIC_METRICS")]
    public_metrics: bool,
    /// Browser origins allowed to open WebSockets besides the server's own host,
    /// comma-separated, each scheme://host[:port] (`*`: any). Pages from the same host (the
    /// demo page) and clients that send no Origin are always allowed.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = list_item)]
    allowed_origins: Vec<String>,
    /// Redis URL (redis://host:port/): cluster mode, channels shared with every node on the
    /// same Redis. Without it, the embedded in-memory broker.
    #[arg(long, env = "HERALD_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// The longest one Redis call may take before it counts as failed.
    #[arg(long, env = "HERALD_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    redis_timeout: Duration,
    /// Messages each channel keeps for clients that reconnect (0: no history, no recovery).
    /// 100 covers the minute or two of a network switch or a deploy for a feed or a chat room.
    #[arg(long, env = "HERALD_HISTORY_SIZE", default_value_t = 100)]
    history_size: usize,
    /// How long a message stays in its channel's history: past a network switch or a deploy,
    /// short of replaying a flood to a client away for longer.
    #[arg(long, env = "HERALD_HISTORY_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    history_ttl: Duration,
    /// The most memory all histories on this node hold together (e.g. 64MiB, 1GiB); the
    /// node's oldest messages go first past it.
    #[arg(long, env = "HERALD_HISTORY_MEMORY", default_value = "64MiB")]
    history_memory: bytesize::ByteSize,
    /// How long a publish, send or broadcast with an Idempotency-Key is remembered: a retry
    /// with the key within it gets the first reply and is not delivered again. 5 minutes
    /// outlasts any useful retry of a real-time message, and is how long a channel keeps its
    /// offsets without publishes: a replayed offset never dates from before a restart at 1.
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    idempotency_window: Duration,
    /// Idempotency keys remembered per route (publish, send, broadcast) by the in-memory
    /// broker; past it the oldest is forgotten first, and a retry with it is carried out
    /// again. In cluster mode keys live in Redis (each for the window) and this does not apply.
    #[arg(long, env = "HERALD_IDEMPOTENCY_KEYS", default_value_t = 100_000)]
    idempotency_keys: usize,
    /// On SIGINT/SIGTERM, how long connections get to close before the server exits.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// HMAC secret (HS256/384/512, at least 32 bytes) that signs client tokens. With it (or
    /// --jwt-public-key) /ws needs a token; without either, clients are anonymous.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM file with the public key (RSA, EC P-256/P-384, Ed25519) that verifies client tokens.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// Clock skew allowed on token exp/nbf (e.g. 30s).
    #[arg(long, env = "HERALD_JWT_LEEWAY", default_value = "0s", value_parser = humantime::parse_duration)]
    jwt_leeway: Duration,
    /// Require this `iss` in client tokens.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Require this `aud` in client tokens.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

impl ServeArgs {
    fn config(&self) -> Result<Config, String> {
        let public_key = match &self.jwt_public_key {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|err| {
                format!("cannot read --jwt-public-key {}: {err}", path.display())
            })?),
            None => None,
        };
        let defaults = Config::default();
        Ok(defaults
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
            .public_metrics(self.public_metrics)
            .allowed_origins(self.allowed_origins.clone())
            .jwt_secret(self.jwt_secret.clone())
            .jwt_public_key(public_key)
            .jwt_leeway(self.jwt_leeway)
            .jwt_issuer(self.jwt_issuer.clone())
            .jwt_audience(self.jwt_audience.clone())
            .redis(self.redis.clone())
            .redis_timeout(self.redis_timeout)
            .history_size(self.history_size)
            .history_ttl(self.history_ttl)
            .history_memory(self.history_memory.as_u64())
            .idempotency_window(self.idempotency_window)
            .idempotency_keys(self.idempotency_keys))
    }
}

/// One item of a comma-separated list, with the spaces around it trimmed (`a, b` is two
/// items); an empty item is an error rather than something silently dropped or matched.
fn list_item(item: &str) -> Result<String, String> {
    let item = item.trim();
    if item.is_empty() {
        Err("empty item in a comma-separated list".to_owned())
    } else {
        Ok(item.to_owned())
    }
}

/// Parses `--listen`: `IP:PORT`, or `HOST:PORT` resolved once, now. Of several addresses a
/// name resolves to, the first IPv4 one is taken (`localhost` is then `127.0.0.1`, which
/// clients that try IPv6 first still reach after their IPv6 attempt is refused).
fn listen_address(value: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    const FORM: &str = "expected HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080, localhost:8080 \
                        or [::1]:8080";
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    if !value.contains(':') {
        return Err(format!("no port in {value:?}; {FORM}"));
    }
    let addrs: Vec<SocketAddr> = value
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {value:?} ({err}); {FORM}"))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{value:?} resolves to no address; {FORM}"))
}

/// `herald token`: prints the token, or why it cannot be minted (exit 2).
fn print_token(args: &TokenArgs) -> ExitCode {
    let algorithm = match args.alg {
        HmacAlgorithm::Hs256 => Algorithm::HS256,
        HmacAlgorithm::Hs384 => Algorithm::HS384,
        HmacAlgorithm::Hs512 => Algorithm::HS512,
    };
    let request = TokenRequest {
        subject: args.sub.clone(),
        channels: args.channels.clone(),
        publish: args.publish.clone(),
        send: args.send.clone(),
        ttl: args.ttl,
        issuer: args.issuer.clone(),
        audience: args.audience.clone(),
    };
    match herald::auth::mint(&args.jwt_secret, algorithm, &request) {
        Ok(token) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout(), "{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            report(format_args!("{err}"));
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = &cli.command {
        return print_token(args);
    }
    let cli = cli.serve;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours for a terminal only: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its default reports a failed log write with `eprintln!`, which panics when stderr is
        // gone (a closed pipe): a server must outlive its log reader.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match cli.config() {
        Ok(config) => config,
        Err(err) => {
            report(format_args!("{err}"));
            return ExitCode::from(2);
        }
    };
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
                report(format_args!(
                    "cannot listen on {} (--listen / HERALD_LISTEN): {err}",
                    cli.listen
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_are_trimmed_and_empty_ones_refused() {
        let cli = Cli::try_parse_from([
            "herald",
            "--allowed-origins",
            "https://a.example, https://b.example",
            "--api-key",
            " k1 ,k2",
        ])
        .expect("parses");
        assert_eq!(
            cli.serve.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(cli.serve.api_keys, ["k1", "k2"]);
        for empty in ["a,,b", "a,", " "] {
            assert!(
                Cli::try_parse_from(["herald", "--allowed-origins", empty]).is_err(),
                "{empty:?}"
            );
        }
    }

    #[test]
    fn listen_takes_host_names() {
        assert_eq!(
            listen_address("localhost:8080"),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(listen_address("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
        let err = listen_address("8080").expect_err("no host");
        assert!(err.contains("e.g. 127.0.0.1:8080"), "{err}");
        let err = listen_address("localhost").expect_err("no port");
        assert!(err.contains("no port"), "{err}");
    }

    #[test]
    fn idempotency_flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "herald",
            "--idempotency-window",
            "90s",
            "--idempotency-keys",
            "500",
        ])
        .expect("parses");
        let config = cli.serve.config().expect("a config");
        assert_eq!(config.idempotency_window, Duration::from_secs(90));
        assert_eq!(config.idempotency_keys, 500);
    }

    /// The flags repeat the library's defaults (clap shows them in `--help`); they must not
    /// drift apart.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["herald"]).expect("no flags parse");
        let from_flags = cli.serve.config().expect("defaults are a config");
        assert_eq!(
            format!("{from_flags:?}"),
            format!("{:?}", Config::default())
        );
    }
}

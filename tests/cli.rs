//! The `herald` binary itself: flags, environment variables, and SIGTERM.

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// Kills the child on drop, so a failing test leaves no server behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server as `command` sets it up, logging at info level without colours, and
/// returns it with its log pipe.
fn start_logged(command: &mut Command) -> (Running, ChildStderr) {
    let child = command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let mut server = Running(child);
    let stderr = server.0.stderr.take().expect("stderr");
    (server, stderr)
}

#[test]
fn help_and_version() {
    let help = Command::new(HERALD).arg("--help").output().expect("run");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--shards",
        "--queue-capacity",
        "--max-message-bytes",
        "--max-connections",
        "--max-subscriptions",
        "--handshake-timeout",
        "--ping-interval",
        "--idle-timeout",
        "--shutdown-grace",
        "--api-key",
        "--allowed-origins",
        "HERALD_LISTEN",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}");
    }
    let version = Command::new(HERALD).arg("--version").output().expect("run");
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn invalid_settings_exit_with_a_clear_message() {
    let zero = Command::new(HERALD)
        .args(["--queue-capacity", "0"])
        .output()
        .expect("run");
    assert_eq!(zero.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&zero.stderr).contains("queue-capacity must be at least 1"));
    let inverted = Command::new(HERALD)
        .env("HERALD_PING_INTERVAL", "30s")
        .env("HERALD_IDLE_TIMEOUT", "10s")
        .output()
        .expect("run");
    assert_eq!(inverted.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&inverted.stderr).contains("idle-timeout"));
    let bad_duration = Command::new(HERALD)
        .args(["--idle-timeout", "soon"])
        .output()
        .expect("run");
    assert_eq!(bad_duration.status.code(), Some(2), "clap rejects it");
}

#[tokio::test]
async fn env_configured_server_serves_and_exits_cleanly_on_sigterm() {
    let (mut server, stderr) = start_logged(
        Command::new(HERALD)
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env("HERALD_SHUTDOWN_GRACE", "2s"),
    );
    // The log pipe is closed once the address is read: the server must go on (and shut down
    // cleanly) without a reader for its log.
    let addr: SocketAddr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        lines
            .find_map(|line| {
                let line = line.ok()?;
                let at = line.find("addr=")?;
                line[at + 5..].split_whitespace().next()?.parse().ok()
            })
            .expect("the start-up log names the address")
    })
    .await
    .expect("read log");

    let mut http = common::HttpClient::connect(addr).await;
    assert_eq!(http.get("/healthz").await.status, 200);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    let _welcome = common::recv(&mut ws).await;

    let killed = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    assert_eq!(
        common::expect_close(&mut ws).await.0,
        1001,
        "clients get going away"
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "exits within the grace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
}

/// Starts the binary with `args` and returns it, its address, and its log up to the first
/// line that contains `until` (within [`common::WAIT`]).
fn spawn_logged(args: &[&str], until: &str) -> (Running, SocketAddr, Vec<String>) {
    let (server, stderr) = start_logged(
        Command::new(HERALD)
            .args(["--listen", "127.0.0.1:0"])
            .args(args),
    );
    let log = read_log_until(stderr, until);
    let addr = log_addr(&log);
    (server, addr, log)
}

#[tokio::test]
async fn anonymous_start_warns_and_token_subcommand_mints_accepted_tokens() {
    // The warning is logged before the one about API keys, so reading up to that one would
    // show it for the server with a JWT secret below, if it logged it.
    let (_anonymous, _, log) = spawn_logged(&[], "no --api-key");
    assert!(
        log.iter()
            .any(|line| line.contains("WebSocket clients are anonymous")),
        "no warning about anonymous clients in {log:#?}"
    );

    let secret = "cli-test-secret-0123456789abcdefghij";
    let minted = Command::new(HERALD)
        .args([
            "token",
            "--sub",
            "alice",
            "--channels",
            "news,user:alice:*",
            "--ttl",
            "5m",
        ])
        .env("HERALD_JWT_SECRET", secret)
        .output()
        .expect("run herald token");
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let short = Command::new(HERALD)
        .args(["token", "--sub", "alice", "--jwt-secret", "short"])
        .output()
        .expect("run herald token");
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 bytes"));

    let (_server, addr, log) = spawn_logged(&["--jwt-secret", secret], "no --api-key");
    assert!(
        !log.iter().any(|line| line.contains("anonymous")),
        "{log:#?}"
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?channels=news&token={token}"))
            .await
            .expect("connect with the minted token");
    let welcome = common::recv_json(&mut ws).await;
    assert_eq!(welcome["client_id"], "alice");
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?channels=secret&token={token}"))
            .await;
    assert!(
        refused.is_err(),
        "a channel outside the token's patterns is refused"
    );
    let anonymous = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    assert!(anonymous.is_err(), "no token, no WebSocket");
}

#[test]
fn bad_lists_origins_and_redis_urls_exit_2_naming_the_value() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let output = Command::new(HERALD)
            .args(args)
            .envs(envs.iter().copied())
            .output()
            .expect("run");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(
        &["--allowed-origins", "https://a.example,,https://b.example"],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("empty item"), "{stderr}");
    let (code, stderr) = run(&[], &[("HERALD_API_KEY", "k1, ")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("empty item"), "{stderr}");
    let (code, stderr) = run(
        &["--allowed-origins", "https://a.example, example.com"],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--allowed-origins") && stderr.contains("\"example.com\""),
        "{stderr}"
    );
    let (code, stderr) = run(&["--redis", "127.0.0.1:6379"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("redis://host:port/"), "{stderr}");
    let (code, stderr) = run(&["--listen", "8080"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("e.g. 127.0.0.1:8080"),
        "{stderr}"
    );
}

#[tokio::test]
async fn spaced_lists_are_trimmed_and_hostnames_listen() {
    // `localhost` resolves to the IPv4 loopback; the key after ", " works.
    let (server, stderr) = start_logged(
        Command::new(HERALD)
            .args(["--listen", "localhost:0"])
            .env("HERALD_API_KEY", "first, second")
            .env(
                "HERALD_ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
    );
    let log = read_log_until(stderr, "settings:");
    let settings = log.last().expect("a settings line");
    assert!(
        settings.contains("origins=same-host,https://a.example,https://b.example")
            && settings.contains("api=api-key (2 configured)")
            && settings.contains("listening=127.0.0.1:"),
        "{settings}"
    );
    assert!(!settings.contains("second"), "no secret in {settings}");
    let addr = log_addr(&log);
    let mut http = common::HttpClient::connect(addr).await;
    let reply = http
        .request(
            "POST",
            "/api/broadcast",
            &[("authorization", "Bearer second")],
            b"hi",
        )
        .await;
    assert_eq!(reply.status, 200, "the key after the comma-space");
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         origin: https://b.example\r\n\r\n"
    );
    assert_eq!(
        common::raw_exchange(addr, upgrade.as_bytes()).await.0,
        101,
        "the origin after the comma-space"
    );
    drop(server);
}

#[tokio::test]
async fn a_busy_port_names_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = Command::new(HERALD)
        .args(["--listen", &addr])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr} (--listen / HERALD_LISTEN)"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn listening_beyond_loopback_without_a_key_warns() {
    let (_server, stderr) = start_logged(Command::new(HERALD).args(["--listen", "0.0.0.0:0"]));
    let log = read_log_until(stderr, "settings:");
    assert!(
        log.iter().any(|line| line.contains("WARN")
            && line.contains("no --api-key while listening beyond loopback")),
        "{log:#?}"
    );
    let (_server, stderr) = start_logged(Command::new(HERALD).args(["--listen", "127.0.0.1:0"]));
    let log = read_log_until(stderr, "settings:");
    assert!(
        !log.iter().any(|line| line.contains("beyond loopback")),
        "{log:#?}"
    );
}

/// The log up to the first line that contains `until` (within [`common::WAIT`]); the rest is
/// drained in the background so the server never blocks on a full pipe.
fn read_log_until(stderr: ChildStderr, until: &str) -> Vec<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + common::WAIT;
    let mut log = Vec::new();
    while !log.last().is_some_and(|line: &String| line.contains(until)) {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(wait)
            .unwrap_or_else(|_| panic!("no log line with {until:?} in {log:#?}"));
        log.push(line);
    }
    log
}

/// The address in the start-up log's `addr=` field.
fn log_addr(log: &[String]) -> SocketAddr {
    log.iter()
        .find_map(|line| {
            let at = line.find("addr=")?;
            line[at + 5..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("the start-up log names the address: {log:#?}"))
}

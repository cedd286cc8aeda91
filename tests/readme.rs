//! The README's examples, run as the README says, against real servers, and compared with what
//! the README says they print.
//!
//! README.md is read at test time. Every `curl` line of a shell block that gives its output (a
//! trailing `# {...}` comment, or a `# {...}` line right after it) runs with the real `curl`,
//! `localhost:<port>` pointed at a server started here with the connections the README's prose
//! describes, and its output is compared with the README's as JSON, where `…` or `...` in a
//! string stands for any text. The cluster examples run against three nodes and a real
//! redis-server (skipped with a notice without one, unless `HERALD_REQUIRE_REDIS=1`). `herald
//! token` lines, and `herald` lines that listen on `0.0.0.0`, run the real binary. The refresh
//! error codes the protocol section lists are exactly those a refresh gets.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::redis_server::{self, RedisServer};
use common::{TestServer, Ws, recv_json, send_json};
use herald::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// How long a state the README describes may take to come about (a node reconnecting to Redis
/// waits up to its 5 s backoff).
const DEADLINE: Duration = Duration::from_secs(30);

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(path).expect("read README.md")
}

/// One command line of a shell block.
#[derive(Debug, Clone)]
struct Example {
    /// The `## ` heading it is under (`""` before the first).
    section: String,
    /// Its line in README.md (1-based).
    line: usize,
    command: String,
    /// What the README says it prints: the comment after it, or a comment line right after it
    /// that starts like JSON.
    expected: Option<String>,
}

impl Example {
    fn is_curl(&self) -> bool {
        self.command.starts_with("curl ")
    }

    /// The JSON value the README says the command prints (prose after it is ignored).
    fn expected_json(&self) -> Value {
        let text = self.expected.as_deref().unwrap_or_else(|| {
            panic!(
                "README.md:{}: `{}` says nothing about its output",
                self.line, self.command
            )
        });
        match serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .next()
        {
            Some(Ok(value)) => value,
            _ => panic!("README.md:{}: the output {text:?} is not JSON", self.line),
        }
    }
}

/// Every ```sh block of the README, in order, as its command lines.
fn sh_blocks(readme: &str) -> Vec<Vec<Example>> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut block: Option<Vec<Example>> = None;
    for (index, text) in readme.lines().enumerate() {
        let Some(lines) = &mut block else {
            if let Some(heading) = text.strip_prefix("## ") {
                heading.trim().clone_into(&mut section);
            } else if text.trim() == "```sh" {
                block = Some(Vec::new());
            }
            continue;
        };
        let text = text.trim();
        if text == "```" {
            blocks.extend(block.take());
        } else if let Some(comment) = text.strip_prefix('#') {
            let comment = comment.trim();
            if let Some(last) = lines.last_mut()
                && last.expected.is_none()
                && (comment.starts_with('{') || comment.starts_with('['))
            {
                last.expected = Some(comment.to_owned());
            }
        } else if !text.is_empty() {
            let (command, expected) = split_comment(text);
            lines.push(Example {
                section: section.clone(),
                line: index + 1,
                command: command.to_owned(),
                expected: expected.map(str::to_owned),
            });
        }
    }
    blocks
}

/// Splits a shell line at a `#` that starts a comment (after a space, outside quotes).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut quote = None;
    let mut after_space = false;
    for (at, c) in line.char_indices() {
        match quote {
            Some(open) if c == open => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && after_space => {
                return (line[..at].trim_end(), Some(line[at + 1..].trim()));
            }
            None => {}
        }
        after_space = c.is_whitespace();
    }
    (line, None)
}

/// The text of the `## heading` section, whitespace collapsed to single spaces.
fn section_text(readme: &str, heading: &str) -> String {
    let start = if heading.is_empty() {
        0
    } else {
        readme
            .find(&format!("\n## {heading}\n"))
            .unwrap_or_else(|| panic!("README.md has no section {heading:?}"))
            + 1
    };
    let rest = &readme[start..];
    let end = rest[1..].find("\n## ").map_or(rest.len(), |at| at + 1);
    rest[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Asserts that the README describes the setup a test builds, so that the two change together.
fn assert_readme_says(readme: &str, heading: &str, setup: &str) {
    assert!(
        section_text(readme, heading).contains(setup),
        "the section {heading:?} of README.md no longer says {setup:?}: the test sets that up; \
         change them together"
    );
}

/// Whether `actual` is what the README shows as `expected`: equal JSON, except that a string
/// with `…` or `...` in the README matches any text in their place.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(pattern), Value::String(text)) => glob(pattern, text),
        (Value::Object(expected), Value::Object(actual)) => {
            expected.len() == actual.len()
                && expected
                    .iter()
                    .all(|(key, value)| actual.get(key).is_some_and(|a| matches(value, a)))
        }
        (Value::Array(expected), Value::Array(actual)) => {
            expected.len() == actual.len()
                && expected.iter().zip(actual).all(|(e, a)| matches(e, a))
        }
        _ => expected == actual,
    }
}

/// `pattern` with `…` or `...` standing for any text.
fn glob(pattern: &str, text: &str) -> bool {
    let pattern = pattern.replace("...", "…");
    let parts: Vec<&str> = pattern.split('…').collect();
    let [first, middle @ .., last] = &parts[..] else {
        return pattern == text;
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Runs `script` with `sh -c` (the `herald` binary on the `PATH`), within `DEADLINE`.
async fn sh(script: String) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", path_with_herald())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sh");
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().expect("wait for sh").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`{script}` did not finish within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("sh output")
    })
    .await
    .expect("sh task")
}

/// `PATH` with the directory of the `herald` binary under test first.
fn path_with_herald() -> String {
    let dir = Path::new(HERALD).parent().expect("binary dir");
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", dir.display())
}

/// Runs a `curl` example with `localhost:<port>` (and `127.0.0.1:<port>`) pointed at the
/// servers in `hosts`, checks its output against the README's, and returns it.
async fn run_curl(example: &Example, hosts: &[(u16, SocketAddr)]) -> Value {
    let mut command = example.command.clone();
    for (port, addr) in hosts {
        for host in ["localhost", "127.0.0.1"] {
            command = command.replace(&format!("{host}:{port}"), &addr.to_string());
        }
    }
    assert!(
        !command.contains("localhost"),
        "README.md:{}: `{}` names a server the test did not start",
        example.line,
        example.command
    );
    let output = sh(command.clone()).await;
    assert!(
        output.status.success(),
        "README.md:{}: `{command}` failed: {}",
        example.line,
        String::from_utf8_lossy(&output.stderr)
    );
    let actual: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "README.md:{}: `{command}` printed {:?}, not JSON: {err}",
            example.line,
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let expected = example.expected_json();
    assert!(
        matches(&expected, &actual),
        "README.md:{}: `{}` prints {actual}; the README says {expected}",
        example.line,
        example.command
    );
    actual
}

/// A demo page's connection as the page opens it (`news` on connect), and how many messages
/// it has received.
struct Tab {
    ws: Ws,
    received: u64,
}

impl Tab {
    async fn open(server: &TestServer, client_id: Option<&str>) -> Self {
        let query = match client_id {
            Some(id) => format!("channels=news&format=json&client_id={id}"),
            None => "channels=news&format=json".to_owned(),
        };
        let (ws, _) = server.connect_json(&query).await;
        Self { ws, received: 0 }
    }

    /// Joins a room as the page's Join button does.
    async fn join(&mut self, channel: &str) {
        send_json(
            &mut self.ws,
            json!({"type": "subscribe", "channel": channel, "id": 1}),
        )
        .await;
        let reply = recv_json(&mut self.ws).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }

    /// Waits for the next message (a publish, direct send or broadcast) to reach the tab.
    async fn receive(&mut self) -> Value {
        let frame = recv_json(&mut self.ws).await;
        assert!(
            ["message", "direct", "broadcast"].contains(&frame["type"].as_str().unwrap_or("")),
            "{frame}"
        );
        self.received += 1;
        frame
    }
}

/// Polls `condition` until it holds, panicking with `what` after [`DEADLINE`].
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `curl` examples of `section` against one fresh server with `tabs` open: each
/// publish, send or broadcast that reaches every tab is received by each before the next line
/// runs, and the server's counters have settled, as they have for a user typing the next line.
async fn run_single_node_section(section: &str, tabs: &[Option<&str>]) {
    let readme = readme();
    let examples: Vec<Example> = sh_blocks(&readme)
        .into_iter()
        .flatten()
        .filter(|example| example.section == section && example.is_curl())
        .collect();
    assert!(!examples.is_empty(), "no curl example in {section:?}");
    let server = TestServer::default().await;
    let mut open = Vec::new();
    for client_id in tabs {
        open.push(Tab::open(&server, *client_id).await);
    }
    let hosts = [(8080, server.addr)];
    // Commands already run with an Idempotency-Key: a repeat is a replayed reply that
    // delivers nothing again.
    let mut keyed = std::collections::HashSet::new();
    for example in &examples {
        settle(&server, &open).await;
        let reply = run_curl(example, &hosts).await;
        if example.command.contains("idempotency-key:") && !keyed.insert(&example.command) {
            continue;
        }
        // A publish, send or broadcast says how many connections it reached.
        let reached = example
            .command
            .contains("-X POST")
            .then(|| {
                reply
                    .get("subscribers")
                    .or_else(|| reply.get("connections"))
            })
            .flatten()
            .and_then(Value::as_u64);
        match reached {
            Some(n) if n == open.len() as u64 => {
                for tab in &mut open {
                    tab.receive().await;
                }
            }
            Some(0) | None => {}
            Some(n) => panic!(
                "README.md:{}: reached {n} of the {} tabs: which ones?",
                example.line,
                open.len()
            ),
        }
    }
}

/// Waits until the server has counted every delivery the tabs received.
async fn settle(server: &TestServer, tabs: &[Tab]) {
    let received: u64 = tabs.iter().map(|tab| tab.received).sum();
    let mut http = server.http().await;
    eventually("the deliveries are counted", async || {
        http.get("/api/stats").await.json()["deliveries"] == received
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quick_start_publish_reaches_the_two_tabs() {
    assert_readme_says(&readme(), "", "Open http://127.0.0.1:8080/ in two tabs");
    run_single_node_section("", &[None, None]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_api_examples_print_what_the_readme_says() {
    assert_readme_says(
        &readme(),
        "HTTP API",
        "a server just started, with the demo page open in two tabs as alice \
         (`http://127.0.0.1:8080/?client_id=alice`): two connections of the client id `alice`, \
         each subscribed to `news`, and no other connection.",
    );
    run_single_node_section("HTTP API", &[Some("alice"), Some("alice")]).await;
}

#[test]
fn every_curl_example_that_shows_its_output_is_run() {
    let covered = ["", "HTTP API", "Cluster mode"];
    let blocks = sh_blocks(&readme());
    let uncovered: Vec<String> = blocks
        .iter()
        .flatten()
        .filter(|example| example.is_curl() && example.expected.is_some())
        .filter(|example| !covered.contains(&example.section.as_str()))
        .map(|example| format!("README.md:{} {}", example.line, example.command))
        .collect();
    assert!(
        uncovered.is_empty(),
        "curl examples in sections tests/readme.rs does not run (give it a scenario): {uncovered:#?}"
    );
    let silent: Vec<String> = blocks
        .iter()
        .flatten()
        .filter(|example| example.is_curl() && example.expected.is_none())
        .filter(|example| covered.contains(&example.section.as_str()))
        .map(|example| format!("README.md:{} {}", example.line, example.command))
        .collect();
    assert!(
        silent.is_empty(),
        "curl examples that do not say what they print: {silent:#?}"
    );
}

/// The nodes of the cluster walkthrough: the ports of its `--listen` lines, and the Redis port
/// they all use.
fn cluster_setup(blocks: &[Vec<Example>]) -> (Vec<u16>, u16) {
    let setup = blocks
        .iter()
        .find(|block| {
            block
                .iter()
                .any(|e| e.command.contains("--listen 127.0.0.1:"))
        })
        .expect("the cluster walkthrough starts nodes");
    let mut redis_port = None;
    let mut nodes = Vec::new();
    for example in setup {
        let words: Vec<&str> = example.command.split_whitespace().collect();
        let after = |flag: &str| {
            let at = words.iter().position(|w| *w == flag)?;
            words.get(at + 1).copied()
        };
        if example.command.starts_with("redis-server ") {
            redis_port = after("--port").and_then(|port| port.parse().ok());
        } else {
            let listen = after("--listen").expect("a node line has --listen");
            let port = listen.rsplit(':').next().and_then(|p| p.parse().ok());
            nodes.push(port.expect("a port"));
            let redis = after("--redis").expect("a node line has --redis");
            let redis_port = redis_port.expect("redis-server comes first");
            assert_eq!(redis, format!("redis://127.0.0.1:{redis_port}/"));
        }
    }
    (
        nodes,
        redis_port.expect("the walkthrough starts redis-server"),
    )
}

async fn readyz(server: &TestServer) -> u16 {
    server.http().await.get("/readyz").await.status
}

/// The room both pages join in the walkthrough (the page's default).
const ROOM: &str = "room:lobby";

/// Runs one block of cluster examples against a fresh Redis and the walkthrough's nodes, with
/// the demo page open on 8082 as alice and on 8083, both in [`ROOM`].
async fn run_cluster_block(block: &[Example], ports: &[u16]) {
    let mut redis = RedisServer::start_on(redis_server::free_port());
    let mut nodes = Vec::new();
    for port in ports {
        let config = Config::default().redis(Some(redis.url()));
        nodes.push((*port, TestServer::start(config).await));
    }
    for (_, node) in &nodes {
        eventually("the node is ready", async || readyz(node).await == 200).await;
    }
    let node = |port: u16| &nodes.iter().find(|(p, _)| *p == port).expect("node").1;
    let mut tabs = vec![
        Tab::open(node(8082), Some("alice")).await,
        Tab::open(node(8083), None).await,
    ];
    for tab in &mut tabs {
        tab.join(ROOM).await;
    }
    let hosts: Vec<(u16, SocketAddr)> = nodes.iter().map(|(port, n)| (*port, n.addr)).collect();
    for example in block {
        let command = example.command.as_str();
        if example.is_curl() {
            run_curl(example, &hosts).await;
        } else if let Some(pattern) = command.strip_prefix("redis-cli PUBSUB CHANNELS ") {
            let channels = redis.pubsub_channels(pattern.trim_matches('\''));
            check_channel_list(example, &channels);
        } else if command == "redis-cli shutdown nosave" {
            redis.kill();
            for (_, node) in &nodes {
                eventually("the node sees Redis down", async || {
                    readyz(node).await == 503
                })
                .await;
            }
        } else if command.starts_with("redis-server ") {
            redis.restart();
            for (_, node) in &nodes {
                eventually("the node is back", async || readyz(node).await == 200).await;
            }
            for tab in &mut tabs {
                let mut gaps = BTreeSet::new();
                while gaps.len() < 2 {
                    let frame = recv_json(&mut tab.ws).await;
                    if frame["type"] == "gap" {
                        gaps.insert(frame["channel"].as_str().unwrap_or("").to_owned());
                    }
                }
                assert_eq!(gaps, BTreeSet::from(["news".to_owned(), ROOM.to_owned()]));
            }
        } else {
            panic!(
                "README.md:{}: tests/readme.rs does not know how to run `{command}`",
                example.line
            );
        }
    }
}

/// Checks a list of Redis channels against the README's: names separated by `, `, `<...>`
/// standing for any text, and a final `...` for "and others".
fn check_channel_list(example: &Example, channels: &[String]) {
    let expected = example.expected.as_deref().expect("the channels listed");
    let (list, open) = match expected.strip_suffix("...") {
        Some(list) => (list, true),
        None => (expected, false),
    };
    let patterns: Vec<String> = list
        .split(", ")
        .map(|name| {
            let mut pattern = String::new();
            let mut rest = name.trim();
            while let Some((before, after)) = rest.split_once('<') {
                pattern.push_str(before);
                pattern.push('…');
                rest = after.split_once('>').map_or("", |(_, after)| after);
            }
            pattern + rest
        })
        .collect();
    for pattern in &patterns {
        assert!(
            channels.iter().any(|channel| glob(pattern, channel)),
            "README.md:{}: no channel is {pattern}: {channels:?}",
            example.line
        );
    }
    if !open {
        for channel in channels {
            assert!(
                patterns.iter().any(|pattern| glob(pattern, channel)),
                "README.md:{}: {channel} is not listed",
                example.line
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_examples_print_what_the_readme_says() {
    if !redis_server::available("readme cluster examples") {
        return;
    }
    let readme = readme();
    assert_readme_says(
        &readme,
        "Cluster mode",
        "Open http://127.0.0.1:8082/?client_id=alice and http://127.0.0.1:8083/ (the demo \
         page), join the same room in both (the page offers `room:lobby`)",
    );
    assert_readme_says(
        &readme,
        "Cluster mode",
        "On the cluster of the walkthrough below, just started (three nodes, and the demo page \
         open as alice on 8082 and anonymously on 8083), node 8081 answers:",
    );
    let blocks: Vec<Vec<Example>> = sh_blocks(&readme)
        .into_iter()
        .filter(|block| block.iter().any(|e| e.section == "Cluster mode"))
        .collect();
    let (ports, _) = cluster_setup(&blocks);
    assert_eq!(ports, [8081, 8082, 8083]);
    let runs: Vec<&Vec<Example>> = blocks
        .iter()
        .filter(|block| block.iter().any(Example::is_curl))
        .collect();
    assert!(runs.len() >= 2, "the replies and the walkthrough");
    for block in runs {
        run_cluster_block(block, &ports).await;
    }
}

/// The word after `flag` in a command line, unquoted.
fn flag_value<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = command.split_whitespace();
    words.find(|word| *word == flag)?;
    words.next().map(|word| word.trim_matches('\''))
}

/// The `export` lines before `line` in `block`, as a script.
fn exports_before(block: &[Example], line: usize) -> String {
    block
        .iter()
        .filter(|e| e.line < line && e.command.starts_with("export "))
        .map(|e| format!("{}\n", e.command))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_examples_print_tokens_the_server_takes() {
    let blocks = sh_blocks(&readme());
    let mut ran = 0;
    for block in &blocks {
        for example in block {
            let Some(args) = ["herald token ", "cargo run --release -- token "]
                .iter()
                .find_map(|prefix| example.command.strip_prefix(prefix))
            else {
                continue;
            };
            // As the README runs it: after its block's exports (which make the secret), and
            // then the secret, for the server here.
            let script = format!(
                "{}herald token {args}\nprintf '%s\\n' \"$HERALD_JWT_SECRET\"",
                exports_before(block, example.line)
            );
            let output = sh(script).await;
            assert!(
                output.status.success(),
                "README.md:{}: {}",
                example.line,
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8(output.stdout).expect("utf-8");
            let [token, secret] = stdout.lines().collect::<Vec<_>>()[..] else {
                panic!("README.md:{}: printed {stdout:?}", example.line);
            };
            let sub = flag_value(&example.command, "--sub").expect("--sub");
            let channels = flag_value(&example.command, "--channels").expect("--channels");
            let config = Config::default().jwt_secret(Some(secret.to_owned()));
            let server = TestServer::start(config).await;
            let (mut ws, client_id) = server.connect_json(&format!("token={token}")).await;
            assert_eq!(client_id, sub, "README.md:{}", example.line);
            for pattern in channels.split(',') {
                let channel = pattern.replace('*', "x");
                send_json(&mut ws, json!({"type": "subscribe", "channel": channel})).await;
                let reply = recv_json(&mut ws).await;
                assert_eq!(
                    reply["type"], "subscribed",
                    "README.md:{}: {reply}",
                    example.line
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 2, "the README's herald token examples");
}

/// Whether a command line runs the server (`herald` with flags, maybe after `VAR=value`s).
fn runs_server(command: &str) -> bool {
    let program = command.split_whitespace().find(|word| !word.contains('='));
    program == Some("herald") && !command.starts_with("herald token")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_examples_that_listen_on_every_interface_start_and_serve() {
    let blocks = sh_blocks(&readme());
    let mut ran = 0;
    for block in &blocks {
        for example in block {
            let Some((_, rest)) = example.command.split_once("0.0.0.0:") else {
                continue;
            };
            if !runs_server(&example.command) {
                continue;
            }
            let readme_port: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let port = redis_server::free_port();
            let command = example.command.replace(
                &format!("0.0.0.0:{readme_port}"),
                &format!("127.0.0.1:{port}"),
            );
            let script = format!("{}exec env {command}", exports_before(block, example.line));
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(&script)
                .env("PATH", path_with_herald())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start herald");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut exited = None;
            eventually(&format!("`{command}` serves"), async || {
                exited = child.try_wait().expect("wait");
                exited.is_some() || tokio::net::TcpStream::connect(addr).await.is_ok()
            })
            .await;
            assert!(
                exited.is_none(),
                "README.md:{}: `{command}` exited: {exited:?}",
                example.line
            );
            let health = common::HttpClient::connect(addr)
                .await
                .get("/healthz")
                .await;
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(health.status, 200, "README.md:{}", example.line);
            ran += 1;
        }
    }
    assert!(ran >= 2, "the README's server examples");
}

const SECRET: &str = "readme-test-secret-that-is-32-bytes-long";
const ISSUER: &str = "https://auth.example.com";
const AUDIENCE: &str = "herald";

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn signed(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// Valid claims for `sub` on the test server, with `extra` merged in (`null` removes one).
fn claims(sub: &str, extra: &Value) -> Value {
    let mut claims = json!({
        "sub": sub, "exp": now() + 3600, "iss": ISSUER, "aud": AUDIENCE, "channels": ["news"],
    });
    for (key, value) in extra.as_object().expect("an object") {
        if value.is_null() {
            claims.as_object_mut().expect("object").remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

/// The `token_*` codes the protocol section's error-frame paragraph lists.
fn refresh_codes_listed(readme: &str) -> BTreeSet<String> {
    let section = section_text(readme, "WebSocket protocol");
    let start = section
        .find("A bad request gets an error frame")
        .expect("the error frame paragraph");
    let paragraph = &section[start..];
    let paragraph = &paragraph[..paragraph
        .find("**Delivery guarantee.**")
        .unwrap_or(paragraph.len())];
    paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|code| code.starts_with("token_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_refresh_error_codes_listed_are_those_a_refresh_gets() {
    let listed = refresh_codes_listed(&readme());
    let unsigned = |header: &Value, claims: &Value| {
        let b64 = |value: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        format!("{}.{}.", b64(header), b64(claims))
    };
    let refusals = [
        ("token_malformed", "junk".to_owned()),
        (
            "token_algorithm_not_allowed",
            unsigned(&json!({"alg": "RS256"}), &claims("alice", &json!({}))),
        ),
        (
            "token_bad_signature",
            signed(
                &claims("alice", &json!({})),
                "another-secret-that-is-32-bytes-long",
            ),
        ),
        (
            "token_expired",
            signed(&claims("alice", &json!({"exp": now() - 3600})), SECRET),
        ),
        (
            "token_not_yet_valid",
            signed(&claims("alice", &json!({"nbf": now() + 3600})), SECRET),
        ),
        (
            "token_missing_claim",
            signed(&claims("alice", &json!({"exp": null})), SECRET),
        ),
        (
            "token_wrong_issuer",
            signed(&claims("alice", &json!({"iss": "https://other"})), SECRET),
        ),
        (
            "token_wrong_audience",
            signed(&claims("alice", &json!({"aud": "other"})), SECRET),
        ),
        (
            "token_invalid_claims",
            signed(&claims("alice", &json!({"channels": "news"})), SECRET),
        ),
        (
            "token_subject_changed",
            signed(&claims("bob", &json!({})), SECRET),
        ),
    ];
    let config = Config::default()
        .jwt_secret(Some(SECRET.to_owned()))
        .jwt_issuer(Some(ISSUER.to_owned()))
        .jwt_audience(Some(AUDIENCE.to_owned()));
    let server = TestServer::start(config).await;
    let token = signed(&claims("alice", &json!({})), SECRET);
    let (mut ws, _) = server.connect_json(&format!("token={token}")).await;
    for (code, refused) in &refusals {
        send_json(&mut ws, json!({"type": "refresh", "token": refused})).await;
        let reply = recv_json(&mut ws).await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(*code)),
            "{reply}"
        );
    }
    send_json(&mut ws, json!({"type": "refresh", "token": token})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "refreshed");
    let produced: BTreeSet<String> = refusals
        .iter()
        .map(|(code, _)| (*code).to_owned())
        .collect();
    assert_eq!(
        listed, produced,
        "the README's refresh error codes are not the ones a refresh gets"
    );
}

//! Real `redis-server` processes for the cluster tests: started on a free port, stopped by PID
//! (on drop too), restartable on the same port.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set to `1` (as `.ci/run` does) to fail instead of skipping when redis-server is missing.
pub const REQUIRE_VAR: &str = "HERALD_REQUIRE_REDIS";

/// One redis-server child process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Where a persistent server keeps its append-only file (every write fsynced), so that a
    /// kill and restart loses nothing; `None` for a server that starts empty every time.
    dir: Option<std::path::PathBuf>,
}

/// Whether `redis-server` can be run here. When it cannot, prints a loud notice and returns
/// false, or panics when [`REQUIRE_VAR`] is set.
pub fn available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return true;
    }
    if std::env::var(REQUIRE_VAR).is_ok_and(|value| value == "1") {
        panic!("{test}: redis-server is not installed and {REQUIRE_VAR}=1");
    }
    // Written to the process's stderr directly: the test harness captures `eprintln!` of
    // passing tests, and this notice must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: redis-server is not installed (apt-get install redis-server); \
         set {REQUIRE_VAR}=1 to make this a failure ***\n"
    );
    false
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING; `None` (after
    /// the notice of [`available`]) when redis-server is not installed.
    pub fn start(test: &str) -> Option<Self> {
        available(test).then(|| Self::start_on(free_port()))
    }

    /// Starts redis-server on `port` and waits until it answers PING.
    pub fn start_on(port: u16) -> Self {
        let mut server = Self {
            port,
            child: None,
            dir: None,
        };
        server.restart();
        server
    }

    /// Like [`RedisServer::start`], with an append-only file fsynced on every write: a kill
    /// and [`RedisServer::restart`] keep every stream and history.
    pub fn start_persistent(test: &str) -> Option<Self> {
        if !available(test) {
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis data dir");
        let mut server = Self {
            port,
            child: None,
            dir: Some(dir),
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the process (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut command = Command::new("redis-server");
            command.args(["--port", &self.port.to_string()]).args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ]);
            match &self.dir {
                Some(dir) => command.arg("--dir").arg(dir).args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ]),
                None => command.args(["--appendonly", "no"]),
            };
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.child = Some(child);
            if self.wait_for_pong(Duration::from_secs(5)) {
                return;
            }
            // The port may still be held by the previous process's socket: try again.
            self.kill();
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_pong(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            if self
                .command(&["PING"])
                .is_some_and(|reply| reply.starts_with("+PONG"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends one command (RESP) on a fresh connection; returns the raw reply, or `None` if the
    /// server cannot be reached.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        // One read is enough for the short replies the tests ask for; a second read catches
        // a reply split by the network stack.
        loop {
            let n = stream.read(&mut chunk).ok()?;
            reply.extend_from_slice(&chunk[..n]);
            if n == 0 || complete(&reply) {
                break;
            }
        }
        Some(String::from_utf8_lossy(&reply).into_owned())
    }

    /// `PUBSUB CHANNELS <pattern>`, as a list of names.
    pub fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let reply = self
            .command(&["PUBSUB", "CHANNELS", pattern])
            .expect("redis answers");
        reply
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.starts_with('$') && !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `PUBSUB NUMSUB <channel>`: how many connections (nodes) subscribe to it; `None` when
    /// Redis does not answer (it is paused, say).
    pub fn numsub(&self, channel: &str) -> Option<u64> {
        self.command(&["PUBSUB", "NUMSUB", channel])?
            .split("\r\n")
            .filter_map(|line| line.strip_prefix(':'))
            .last()
            .and_then(|count| count.parse().ok())
    }
}

/// Whether a RESP reply looks complete: it ends in CRLF and every announced array element
/// and bulk string has arrived (enough for the flat replies used here).
fn complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    if !text.ends_with("\r\n") {
        return false;
    }
    let Some(count) = text
        .strip_prefix('*')
        .and_then(|rest| rest.split("\r\n").next())
        .and_then(|count| count.parse::<usize>().ok())
    else {
        return true;
    };
    let lines: Vec<&str> = text.split("\r\n").skip(1).collect();
    let mut elements = 0;
    let mut at = 0;
    while at < lines.len() && !lines[at].is_empty() {
        if lines[at].starts_with('$') {
            at += 2;
        } else {
            at += 1;
        }
        elements += 1;
    }
    elements >= count && at < lines.len()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

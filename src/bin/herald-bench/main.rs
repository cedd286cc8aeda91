//! `herald-bench`: the load generator for Herald and for the servers it is compared with.
//!
//! Modes: `fanout` (N subscribers, M publishes, delivery rate, latency and loss), `slow` (fanout
//! with K subscribers that never read), `idle` (C idle connections, the server's memory per
//! connection), `echo` (round trips), `handshakes` (upgrades per second) and `storm` (N clients
//! drop at once and reconnect with their channel position: recovery, loss, catch-up time; it
//! speaks Herald's recovery protocol). Every URL is a
//! required flag (no server is assumed), so any server that speaks WebSocket and accepts
//! publishes over HTTP or WebSocket can be measured. The client is its own minimal WebSocket implementation, one current-thread tokio
//! runtime per OS thread, so that it is not the bottleneck; it reports its own CPU use so a
//! reader can check.
//!
//! Modules: [`fanout`] (fanout and slow), [`idle`], [`echo`] (echo and handshakes), [`storm`],
//! [`ws`] (the client protocol code), [`hist`] (latency histogram), [`report`] (output), [`sys`]
//! (OS calls).

mod echo;
mod fanout;
mod hist;
mod idle;
mod report;
mod storm;
mod sys;
mod ws;

use std::future::Future;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::report::Report;

/// herald-bench: load generator for WebSocket notification servers (Herald and its peers).
///
/// Runs one bounded measurement against the server its URL flags name (they are required:
/// nothing is assumed about where the server is) and prints a table (or, with --json, one JSON
/// object) on stdout; a progress line goes to stderr while it runs. Latencies come from a timestamp carried in each
/// payload (`hb:<seq>:<send_ns>:` padded with `x`), found wherever it sits in the frame, so the
/// server may relay the body raw or inside a JSON envelope.
#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    long_about,
    arg_required_else_help = true
)]
struct Cli {
    /// What to measure.
    #[command(subcommand)]
    mode: Mode,
    /// Options every mode takes.
    #[command(flatten)]
    common: Common,
}

/// The measurement to run.
#[derive(Debug, Subcommand)]
enum Mode {
    /// N subscribers, M publishes of S bytes: deliveries/s, latency percentiles, loss.
    Fanout(fanout::FanoutArgs),
    /// Fan-out where K of the N subscribers never read: the others' throughput and latency,
    /// how many slow ones the server dropped, the server's memory growth.
    Slow(fanout::SlowArgs),
    /// Hold C idle connections and report the server's resident memory per connection.
    Idle(idle::IdleArgs),
    /// E connections doing round trips (send a masked text frame, wait for the echo).
    Echo(echo::EchoArgs),
    /// Open, complete and close N WebSocket handshakes with bounded concurrency.
    Handshakes(echo::HandshakeArgs),
    /// Reconnect storm: N clients on one channel drop at once while publishing goes on and
    /// reconnect with their position; recovered or not, loss, duplicates, time to catch up.
    Storm(storm::StormArgs),
}

/// Options shared by every mode.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// OS threads, each running a current-thread runtime with a share of the connections
    /// [default: CPUs in this process's affinity mask].
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The server's PID (its direct children are included): CPU seconds and resident memory
    /// are read from /proc. Required by `idle`.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Hard limit on the whole run; past it herald-bench exits with status 3.
    #[arg(long, global = true, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Spread client source addresses over 127.0.0.2 ..= 127.0.0.(1+N) when the target is on
    /// loopback (0: let the kernel choose).
    #[arg(long, global = true, default_value_t = 200)]
    pub spread: usize,
    /// Time allowed for one WebSocket handshake.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// No progress line on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
}

impl Common {
    /// The number of worker threads to use.
    pub fn thread_count(&self) -> usize {
        self.threads.unwrap_or_else(sys::affinity_cpus).max(1)
    }
}

/// Starts worker thread `index`: a current-thread tokio runtime with a `LocalSet`, running the
/// future `make(index)` builds (it may spawn `!Send` tasks with `spawn_local`).
pub fn spawn_worker<R, F, Fut>(index: usize, make: F) -> JoinHandle<R>
where
    R: Send + 'static,
    F: FnOnce(usize) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
{
    std::thread::Builder::new()
        .name(format!("herald-bench-{index}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, make(index))
        })
        .expect("spawn worker thread")
}

/// CPU use of this process and of the server over a measurement window.
#[derive(Debug)]
pub struct Meter {
    wall: Instant,
    self_cpu: f64,
    server_cpu: Option<f64>,
    server_pid: Option<u32>,
    cpus: Vec<(u64, u64)>,
}

impl Meter {
    /// Starts measuring now.
    pub fn start(server_pid: Option<u32>) -> Self {
        Self {
            wall: Instant::now(),
            self_cpu: sys::self_cpu_secs(),
            server_cpu: server_pid.and_then(sys::server_cpu_secs),
            server_pid,
            cpus: sys::cpu_jiffies(),
        }
    }

    /// Ends the window.
    pub fn finish(&self) -> Usage {
        let server = match (self.server_pid, self.server_cpu) {
            (Some(pid), Some(start)) => sys::server_cpu_secs(pid).map(|now| now - start),
            _ => None,
        };
        let cpus = sys::cpu_jiffies()
            .iter()
            .zip(&self.cpus)
            .map(|(now, then)| {
                let total = now.1.saturating_sub(then.1).max(1);
                100.0 * now.0.saturating_sub(then.0) as f64 / total as f64
            })
            .collect();
        Usage {
            wall: self.wall.elapsed().as_secs_f64(),
            cpu: sys::self_cpu_secs() - self.self_cpu,
            server,
            cpu_busy_pct: cpus,
        }
    }
}

/// CPU used over a measurement window (see [`Meter`]).
#[derive(Debug, Clone)]
pub struct Usage {
    /// Wall-clock seconds of the window.
    pub wall: f64,
    /// CPU seconds this process used.
    pub cpu: f64,
    /// CPU seconds the server (and its direct children) used, with `--server-pid`.
    pub server: Option<f64>,
    /// How busy each CPU of the machine was (all processes), from `/proc/stat`: shows other
    /// load on the cores the server and herald-bench run on.
    pub cpu_busy_pct: Vec<f64>,
}

impl Usage {
    /// Adds `measure_wall_s`, `bench_cpu_s`, `bench_cpu_pct` (percent of one core per
    /// thread) and, when known, `server_cpu_s` and `server_cpu_pct` to `report`.
    pub fn add_to(&self, report: &mut Report, threads: usize) {
        report.set_f("measure_wall_s", self.wall, 3);
        report.set_f("bench_cpu_s", self.cpu, 3);
        report.set_f(
            "bench_cpu_pct",
            100.0 * self.cpu / self.wall / threads as f64,
            1,
        );
        if let Some(server) = self.server {
            report.set_f("server_cpu_s", server, 2);
            report.set_f("server_cpu_pct", 100.0 * server / self.wall, 1);
        }
        let busy: Vec<f64> = self
            .cpu_busy_pct
            .iter()
            .map(|p| (p * 10.0).round() / 10.0)
            .collect();
        report.set("cpu_busy_pct", busy);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = cli.common.clone();
    let limit = common.timeout;
    std::thread::Builder::new()
        .name("herald-bench-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("\nherald-bench: hard timeout ({limit:?}) reached, exiting");
            std::process::exit(3);
        })
        .expect("spawn watchdog");
    let result = match cli.mode {
        Mode::Fanout(args) => fanout::run_fanout(args, &common),
        Mode::Slow(args) => fanout::run_slow(args, &common),
        Mode::Idle(args) => idle::run(args, &common),
        Mode::Echo(args) => echo::run_echo(args, &common),
        Mode::Handshakes(args) => echo::run_handshakes(args, &common),
        Mode::Storm(args) => storm::run(args, &common),
    };
    match result {
        Ok(report) => {
            report.print(common.json);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("herald-bench: {message}");
            ExitCode::from(2)
        }
    }
}

//! `echo` (E connections each doing round trips: a masked text frame out, wait for the echo)
//! and `handshakes` (open, upgrade and close N WebSocket connections with bounded concurrency).

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::hist::Histogram;
use crate::report::{Report, human, progress, progress_done};
use crate::sys::{mono_ns, raise_nofile_limit, spread_source};
use crate::ws::{self, FrameScanner, Url};
use crate::{Common, Meter, spawn_worker};

/// Options of `echo`.
#[derive(Debug, Args, Clone)]
pub struct EchoArgs {
    /// Echo WebSocket URL, e.g. `ws://127.0.0.1:8080/echo` (`{i}` is replaced by the
    /// connection's index, e.g. nchan's `ws://127.0.0.1:PORT/pubsub/e{i}`).
    #[arg(long)]
    pub url: String,
    /// Connections, each with one round trip at a time.
    #[arg(long, short = 'c', default_value_t = 50)]
    pub connections: usize,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// How long to measure.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Round trips per connection before measuring (not counted).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
}

/// Options of `handshakes`.
#[derive(Debug, Args, Clone)]
pub struct HandshakeArgs {
    /// WebSocket URL to upgrade to, e.g. `ws://127.0.0.1:8080/ws` (`{i}` is replaced by the
    /// attempt's index).
    #[arg(long)]
    pub url: String,
    /// Handshakes to perform.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub count: usize,
    /// Handshakes in progress at once (in total).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

const CONNECT: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

#[derive(Debug)]
struct EchoShared {
    url: Url,
    connections: usize,
    size: usize,
    warmup: u64,
    threads: usize,
    spread: usize,
    handshake_timeout: Duration,
    phase: watch::Sender<u8>,
    connected: AtomicUsize,
    failed: AtomicUsize,
    warmed: AtomicUsize,
    broken: AtomicUsize,
    round_trips: Vec<AtomicU64>,
}

/// Runs `echo`.
pub fn run_echo(args: EchoArgs, common: &Common) -> Result<Report, String> {
    raise_nofile_limit();
    let threads = common.thread_count();
    let (phase, _) = watch::channel(CONNECT);
    let shared = Arc::new(EchoShared {
        url: Url::parse(&args.url)?,
        connections: args.connections,
        size: args.size,
        warmup: args.warmup,
        threads,
        spread: common.spread,
        handshake_timeout: common.handshake_timeout,
        phase,
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        warmed: AtomicUsize::new(0),
        broken: AtomicUsize::new(0),
        round_trips: (0..threads).map(|_| AtomicU64::new(0)).collect(),
    });
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            spawn_worker(t, move |index| echo_worker(index, shared))
        })
        .collect();
    let ready_deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_millis(args.connections as u64);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let settled =
            shared.warmed.load(Relaxed) + shared.failed.load(Relaxed) + shared.broken.load(Relaxed);
        if settled >= args.connections || Instant::now() >= ready_deadline {
            break;
        }
    }
    let meter = Meter::start(common.server_pid);
    let start = Instant::now();
    shared.phase.send_replace(MEASURE);
    let mut last = 0u64;
    while start.elapsed() < args.duration {
        std::thread::sleep(
            Duration::from_secs(1).min(args.duration.saturating_sub(start.elapsed())),
        );
        let total: u64 = shared.round_trips.iter().map(|c| c.load(Relaxed)).sum();
        progress(
            common.quiet,
            &format!(
                "[echo] {:.0}s  connections {}  round trips {} ({}/s)",
                start.elapsed().as_secs_f64(),
                shared.connected.load(Relaxed),
                human(total as f64),
                human((total - last) as f64),
            ),
        );
        last = total;
    }
    let wall = start.elapsed();
    let usage = meter.finish();
    let server_cpu = usage.server;
    shared.phase.send_replace(STOP);
    let mut hist = Histogram::new();
    for w in workers {
        if let Ok(h) = w.join() {
            hist.merge(&h);
        }
    }
    progress_done(common.quiet);
    let mut report = Report::new("echo");
    report.set("connections", args.connections);
    report.set("size", args.size);
    report.set("threads", threads);
    report.set("connected", shared.connected.load(Relaxed));
    report.set("connections_failed", shared.failed.load(Relaxed));
    report.set("connections_broken", shared.broken.load(Relaxed));
    report.set("round_trips", hist.count());
    report.set_f(
        "round_trips_per_s",
        hist.count() as f64 / wall.as_secs_f64(),
        0,
    );
    report.latency("latency_ms", &hist);
    usage.add_to(&mut report, threads);
    if let Some(cpu) = server_cpu
        && hist.count() > 0
    {
        report.set_f(
            "server_cpu_s_per_million_round_trips",
            cpu / (hist.count() as f64 / 1e6),
            3,
        );
    }
    Ok(report)
}

async fn echo_worker(index: usize, shared: Arc<EchoShared>) -> Histogram {
    let hist = Rc::new(RefCell::new(Histogram::new()));
    let semaphore = Rc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in (index..shared.connections).step_by(shared.threads) {
        let (shared, hist, semaphore) = (shared.clone(), hist.clone(), semaphore.clone());
        tasks.push(tokio::task::spawn_local(async move {
            if echo_conn(i, index, &shared, &hist, &semaphore)
                .await
                .is_err()
            {
                shared.broken.fetch_add(1, Relaxed);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    hist.replace(Histogram::new())
}

/// Reads until one whole data frame has arrived (answering pings); errors on EOF or close.
///
/// Without `TCP_QUICKACK`: the next round trip's frame, written at once, carries the ACK of
/// what was read. Forcing a separate ACK after every read (as the fan-out readers must, since
/// they never write) cost this client a third of its CPU at 50 connections, and the server a
/// packet more per round trip, so echo figures measured the client's ACKs.
async fn read_one(
    stream: &TcpStream,
    scanner: &mut FrameScanner,
    buf: &mut [u8],
    queued: &mut u32,
) -> io::Result<()> {
    loop {
        if *queued > 0 {
            *queued -= 1;
            return Ok(());
        }
        stream.readable().await?;
        let n = match stream.try_read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut closed = false;
        let mut pong = None;
        scanner.feed(&buf[..n], |op, payload, _| match op {
            1 | 2 => *queued += 1,
            8 => closed = true,
            9 => pong = Some(payload.to_vec()),
            _ => {}
        });
        if let Some(payload) = pong {
            let mut frame = Vec::new();
            ws::push_masked(&mut frame, 0xA, &payload, rand::random());
            ws::write_all(stream, &frame).await?;
        }
        if closed {
            return Err(io::Error::other("closed by server"));
        }
    }
}

async fn echo_conn(
    i: usize,
    thread: usize,
    shared: &EchoShared,
    hist: &RefCell<Histogram>,
    semaphore: &Semaphore,
) -> io::Result<()> {
    let url = shared.url.for_index(i);
    let opened = async {
        let _permit = semaphore.acquire().await.map_err(io::Error::other)?;
        let stream = ws::connect(url.addr, spread_source(url.addr, i, shared.spread), None).await?;
        let leftover = ws::handshake(&stream, &url, shared.handshake_timeout).await?;
        Ok::<_, io::Error>((stream, leftover))
    }
    .await;
    let (stream, leftover) = match opened {
        Ok(v) => v,
        Err(_) => {
            shared.failed.fetch_add(1, Relaxed);
            return Ok(());
        }
    };
    shared.connected.fetch_add(1, Relaxed);
    let mut payload = Vec::new();
    ws::push_payload(&mut payload, i as u64, 0, shared.size);
    let mut frame = Vec::new();
    ws::push_masked(&mut frame, 0x1, &payload, rand::random());
    let mut scanner = FrameScanner::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Frames sent before the first echo (a welcome, say) are not echoes: skip them.
    let mut queued = 0u32;
    scanner.feed(&leftover, |_, _, _| {});
    for _ in 0..shared.warmup {
        ws::write_all(&stream, &frame).await?;
        read_one(&stream, &mut scanner, &mut buf, &mut queued).await?;
    }
    queued = 0;
    shared.warmed.fetch_add(1, Relaxed);
    let mut phase = shared.phase.subscribe();
    if phase
        .wait_for(|p| *p >= MEASURE)
        .await
        .map(|p| *p)
        .unwrap_or(STOP)
        == STOP
    {
        return Ok(());
    }
    loop {
        if *phase.borrow_and_update() == STOP {
            break;
        }
        let sent = mono_ns();
        ws::write_all(&stream, &frame).await?;
        read_one(&stream, &mut scanner, &mut buf, &mut queued).await?;
        let rtt = mono_ns() - sent;
        if *phase.borrow() == STOP {
            break;
        }
        hist.borrow_mut().record(rtt);
        shared.round_trips[thread].fetch_add(1, Relaxed);
    }
    let _ = ws::write_all(&stream, &ws::close_frame()).await;
    Ok(())
}

#[derive(Debug)]
struct HandshakeShared {
    url: Url,
    count: usize,
    threads: usize,
    per_thread: usize,
    spread: usize,
    handshake_timeout: Duration,
    next: AtomicUsize,
    ok: AtomicUsize,
    failed: AtomicUsize,
}

/// Runs `handshakes`.
pub fn run_handshakes(args: HandshakeArgs, common: &Common) -> Result<Report, String> {
    raise_nofile_limit();
    let threads = common.thread_count();
    let shared = Arc::new(HandshakeShared {
        url: Url::parse(&args.url)?,
        count: args.count,
        threads,
        per_thread: args.concurrency.div_ceil(threads).max(1),
        spread: common.spread,
        handshake_timeout: common.handshake_timeout,
        next: AtomicUsize::new(0),
        ok: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let meter = Meter::start(common.server_pid);
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            spawn_worker(t, move |_| handshake_worker(shared))
        })
        .collect();
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        progress(
            common.quiet,
            &format!(
                "[handshakes] {}/{} (failed {})",
                shared.ok.load(Relaxed),
                args.count,
                shared.failed.load(Relaxed)
            ),
        );
    }
    let wall = start.elapsed();
    let usage = meter.finish();
    let server_cpu = usage.server;
    let mut hist = Histogram::new();
    for w in workers {
        if let Ok(h) = w.join() {
            hist.merge(&h);
        }
    }
    progress_done(common.quiet);
    let ok = shared.ok.load(Relaxed);
    let mut report = Report::new("handshakes");
    report.set("count", args.count);
    report.set("concurrency", args.concurrency);
    report.set("threads", threads);
    report.set("completed", ok);
    report.set("connections_failed", shared.failed.load(Relaxed));
    report.set_f("handshakes_per_s", ok as f64 / wall.as_secs_f64(), 0);
    report.latency("latency_ms", &hist);
    usage.add_to(&mut report, threads);
    // What a handshake costs the server, whatever the client's speed: the figure to compare.
    if let Some(cpu) = server_cpu
        && ok > 0
    {
        report.set_f(
            "server_cpu_ms_per_thousand_handshakes",
            cpu * 1e3 / (ok as f64 / 1e3),
            1,
        );
    }
    report.note("each handshake: TCP connect, upgrade, check 101 and Sec-WebSocket-Accept (latency covers these), then a close frame and waiting up to 1 s for the server's close or EOF (counted in the rate)");
    Ok(report)
}

async fn handshake_worker(shared: Arc<HandshakeShared>) -> Histogram {
    let hist = Rc::new(RefCell::new(Histogram::new()));
    let mut tasks = Vec::new();
    for _ in 0..shared.per_thread {
        let (shared, hist) = (shared.clone(), hist.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let i = shared.next.fetch_add(1, Relaxed);
                if i >= shared.count {
                    break;
                }
                let started = mono_ns();
                match one_handshake(i, &shared, &mut buf, started, &hist).await {
                    Ok(()) => shared.ok.fetch_add(1, Relaxed),
                    Err(_) => shared.failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let _ = shared.threads;
    hist.replace(Histogram::new())
}

async fn one_handshake(
    i: usize,
    shared: &HandshakeShared,
    buf: &mut [u8],
    started: u64,
    hist: &RefCell<Histogram>,
) -> io::Result<()> {
    let url = shared.url.for_index(i);
    let stream = ws::connect(url.addr, spread_source(url.addr, i, shared.spread), None).await?;
    let leftover = ws::handshake(&stream, &url, shared.handshake_timeout).await?;
    hist.borrow_mut().record(mono_ns() - started);
    ws::write_all(&stream, &ws::close_frame()).await?;
    let mut scanner = FrameScanner::new();
    let mut closed = false;
    scanner.feed(&leftover, |op, _, _| closed |= op == 8);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !closed {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        match stream.try_read(buf) {
            Ok(0) => break,
            Ok(n) => scanner.feed(&buf[..n], |op, _, _| closed |= op == 8),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    Ok(())
}

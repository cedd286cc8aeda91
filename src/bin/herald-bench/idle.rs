//! `idle`: hold C idle connections and read the server's resident memory before and after, for
//! the bytes each connection costs the server. The connections are WebSockets (a `ws://` URL)
//! or Server-Sent Events streams (an `http://` URL such as Herald's `/sse`), so that the two
//! transports can be measured against the same server. Source addresses are spread over
//! 127.0.0.x so more than one address's worth of ephemeral ports could be used, and the
//! open-file limit is raised to its hard limit first.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::{Semaphore, watch};

use crate::report::{Report, progress, progress_done};
use crate::sys::{quickack, raise_nofile_limit, server_rss_bytes, spread_source};
use crate::ws::{self, FrameScanner, Url};
use crate::{Common, spawn_worker};

/// Options of `idle`.
#[derive(Debug, Args, Clone)]
pub struct IdleArgs {
    /// URL to connect to: a WebSocket, e.g. `ws://127.0.0.1:8080/ws?channels=idle`, or an
    /// event stream, e.g. `http://127.0.0.1:8080/sse?channels=idle` (`{i}` is replaced by the
    /// connection's index).
    #[arg(long)]
    pub url: String,
    /// Connections to hold (each needs a file descriptor here: stay below the open-file limit).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// How long to let the server settle after the last connection before reading its memory.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Connection attempts in progress at once (in total).
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

#[derive(Debug)]
struct Shared {
    url: Url,
    /// The URL is an event stream's (`http://`), not a WebSocket's.
    events: bool,
    connections: usize,
    threads: usize,
    spread: usize,
    handshake_timeout: Duration,
    connect_per_thread: usize,
    stop: watch::Sender<bool>,
    connected: AtomicUsize,
    failed: AtomicUsize,
    closed: AtomicUsize,
}

/// Runs `idle`.
pub fn run(args: IdleArgs, common: &Common) -> Result<Report, String> {
    let pid = common.server_pid.ok_or("idle needs --server-pid")?;
    let limit = raise_nofile_limit();
    if (args.connections + 32) as u64 > limit {
        return Err(format!(
            "{} connections need {} file descriptors here; the open-file limit is {limit}",
            args.connections,
            args.connections + 32
        ));
    }
    let threads = common.thread_count();
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        url: Url::parse(&args.url)?,
        events: args.url.starts_with("http://"),
        connections: args.connections,
        threads,
        spread: common.spread,
        handshake_timeout: common.handshake_timeout,
        connect_per_thread: args.connect_concurrency.div_ceil(threads).max(1),
        stop,
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
    });
    let rss_before = server_rss_bytes(pid).ok_or_else(|| format!("no process {pid}"))?;
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            spawn_worker(t, move |index| worker(index, shared))
        })
        .collect();
    let deadline =
        started + Duration::from_secs(60) + Duration::from_millis(args.connections as u64 * 2);
    let mut last_progress = Instant::now();
    let connect_time = loop {
        std::thread::sleep(Duration::from_millis(10));
        let connected = shared.connected.load(Relaxed);
        let failed = shared.failed.load(Relaxed);
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(
                common.quiet,
                &format!(
                    "[idle] connecting {connected}/{} (failed {failed})",
                    args.connections
                ),
            );
        }
        if connected + failed >= args.connections || Instant::now() >= deadline {
            break started.elapsed();
        }
    };
    progress(common.quiet, &format!("[idle] settling {:?}", args.settle));
    std::thread::sleep(args.settle);
    let rss_after = server_rss_bytes(pid).unwrap_or(0);
    let connected = shared.connected.load(Relaxed);
    let closed = shared.closed.load(Relaxed);
    let open = connected.saturating_sub(closed);
    shared.stop.send_replace(true);
    for w in workers {
        let _ = w.join();
    }
    progress_done(common.quiet);

    let mut report = Report::new("idle");
    report.set(
        "transport",
        if shared.events {
            "server-sent events"
        } else {
            "websocket"
        },
    );
    report.set("connections", args.connections);
    report.set("threads", threads);
    report.set("connected", connected);
    report.set("connections_failed", shared.failed.load(Relaxed));
    report.set("closed_by_server", closed);
    report.set("open_at_measurement", open);
    report.set_f("connect_s", connect_time.as_secs_f64(), 3);
    report.set_f(
        "connects_per_s",
        connected as f64 / connect_time.as_secs_f64(),
        0,
    );
    report.set("server_rss_before", rss_before);
    report.set("server_rss_after", rss_after);
    let growth = rss_after as i64 - rss_before as i64;
    report.set("server_rss_growth", growth);
    if open > 0 {
        report.set_f("bytes_per_connection", growth as f64 / open as f64, 0);
    }
    report.note(
        "bytes_per_connection = (server RSS after - before) / connections open at measurement",
    );
    Ok(report)
}

async fn worker(index: usize, shared: Arc<Shared>) {
    let semaphore = Rc::new(Semaphore::new(shared.connect_per_thread));
    let mut tasks = Vec::new();
    for i in (index..shared.connections).step_by(shared.threads) {
        let (shared, semaphore) = (shared.clone(), semaphore.clone());
        tasks.push(tokio::task::spawn_local(async move {
            hold(i, &shared, &semaphore).await
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Opens connection `i` and keeps it open (answering pings) until the run stops.
async fn hold(i: usize, shared: &Shared, semaphore: &Semaphore) {
    let url = shared.url.for_index(i);
    let opened = async {
        let _permit = semaphore.acquire().await.map_err(io::Error::other)?;
        let stream = ws::connect(url.addr, spread_source(url.addr, i, shared.spread), None).await?;
        if shared.events {
            ws::open_event_stream(&stream, &url, shared.handshake_timeout).await?;
        } else {
            ws::handshake(&stream, &url, shared.handshake_timeout).await?;
        }
        Ok::<_, io::Error>(stream)
    }
    .await;
    let Ok(stream) = opened else {
        shared.failed.fetch_add(1, Relaxed);
        return;
    };
    shared.connected.fetch_add(1, Relaxed);
    let mut stop = shared.stop.subscribe();
    let mut scanner = FrameScanner::new();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            r = stream.readable() => if r.is_err() { break },
            _ = stop.wait_for(|s| *s) => return,
        }
        let n = match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        };
        quickack(&stream);
        if shared.events {
            // Events and heartbeats need no answer.
            continue;
        }
        let mut pong = None;
        let mut closed = false;
        scanner.feed(&buf[..n], |op, payload, _| match op {
            9 => pong = Some(payload.to_vec()),
            8 => closed = true,
            _ => {}
        });
        if let Some(payload) = pong {
            let mut frame = Vec::new();
            ws::push_masked(&mut frame, 0xA, &payload, rand::random());
            let _ = ws::write_all(&stream, &frame).await;
        }
        if closed {
            break;
        }
    }
    shared.closed.fetch_add(1, Relaxed);
}

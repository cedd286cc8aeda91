//! `fanout` and `slow`: N subscribers on one channel, M publishes of S bytes over HTTP
//! keep-alive (pipelined) or over a publisher WebSocket, closed loop (bounded in-flight) or open
//! loop (fixed rate, stamped with the intended send time so latency is coordinated-omission
//! safe). Each subscriber keeps a bitmap of the sequences it saw: loss and duplicates are exact.
//!
//! Phases, driven by the main thread through a `watch` channel: connect everything, warm up
//! (a few publishes every subscriber must see, not counted), measure (from the first publish to
//! the last delivery, or a drain timeout after the last publish), stop.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};

use crate::hist::Histogram;
use crate::report::{Report, human, progress, progress_done};
use crate::sys::{mono_ns, quickack, server_rss_bytes, spread_source};
use crate::ws::{self, FrameScanner, Url};
use crate::{Common, Meter, spawn_worker};

/// Options of `fanout`. The server is never assumed: the subscriber URL and one publish URL
/// are required.
#[derive(Debug, Args, Clone)]
#[command(group(ArgGroup::new("publish_url").required(true).args(["pub_url", "pub_ws_url"])))]
pub struct FanoutArgs {
    /// Subscriber WebSocket URL, e.g. `ws://127.0.0.1:8080/ws?channels=bench` (`{i}` is
    /// replaced by the subscriber's index). Repeat it to spread the subscribers round-robin
    /// over several servers (the nodes of a cluster).
    #[arg(long, alias = "subscribe-url", required = true)]
    pub sub_url: Vec<String>,
    /// Publish over HTTP POST to this URL (body = payload, content-type text/plain), e.g.
    /// `http://127.0.0.1:8080/api/publish/bench`.
    #[arg(long)]
    pub pub_url: Option<String>,
    /// Publish over WebSocket instead: text frames of the payload sent to this URL.
    #[arg(long)]
    pub pub_ws_url: Option<String>,
    /// What a WebSocket publish frame carries; `{payload}` is replaced by the payload (for
    /// Herald: '{"type":"publish","channel":"bench","data":"{payload}"}').
    #[arg(long, default_value = "{payload}")]
    pub pub_ws_template: String,
    /// Number of subscribers.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub subscribers: usize,
    /// Number of measured publishes.
    #[arg(long, short = 'm', default_value_t = 1000)]
    pub messages: u64,
    /// Payload size in bytes (at least the marker's length).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Publish connections.
    #[arg(long, default_value_t = 4)]
    pub pub_connections: usize,
    /// Closed loop: publishes in flight, in total across the publish connections (HTTP:
    /// pipelined requests awaiting their response; WebSocket: messages not yet delivered to
    /// every subscriber).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Open loop at this many publishes per second (latency from the intended send time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop publishing after this long (open loop: messages = rate x duration).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up publishes every subscriber must receive before measuring (not counted).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// After the last publish, how long to wait for missing deliveries.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Connection attempts in progress at once (in total).
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// Options of `slow`.
#[derive(Debug, Args, Clone)]
pub struct SlowArgs {
    /// The fan-out to run.
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// How many of the subscribers never read.
    #[arg(long, default_value_t = 10)]
    pub slow: usize,
    /// SO_RCVBUF of the slow subscribers, set before connecting.
    #[arg(long, default_value_t = 4096)]
    pub slow_rcvbuf: u32,
}

const CONNECT: u8 = 0;
const WARMUP: u8 = 1;
const MEASURE: u8 = 2;
const STOP: u8 = 3;
/// Pipelined requests per connection in open-loop mode (the rate, not this, sets the pace).
const OPEN_LOOP_PIPELINE: usize = 1024;

/// How publishes are sent.
#[derive(Debug)]
enum Publish {
    Http(Url),
    Ws {
        url: Url,
        pre: Vec<u8>,
        post: Vec<u8>,
    },
}

/// Everything the threads share (read-mostly; counters are relaxed atomics).
#[derive(Debug)]
struct Shared {
    /// Subscriber `i` connects to `sub_urls[i % len]`.
    sub_urls: Vec<Url>,
    publish: Publish,
    subscribers: usize,
    slow: usize,
    slow_rcvbuf: u32,
    messages: u64,
    warmup: u64,
    size: usize,
    pub_connections: usize,
    in_flight: usize,
    rate: Option<f64>,
    duration: Option<Duration>,
    spread: usize,
    handshake_timeout: Duration,
    threads: usize,
    connect_per_thread: usize,
    phase: watch::Sender<u8>,
    run_start_ns: u64,
    measure_start_ns: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    slow_connected: AtomicUsize,
    closed_early: AtomicUsize,
    warm_ready: AtomicUsize,
    done: AtomicUsize,
    pub_ready: AtomicUsize,
    pub_failed: AtomicUsize,
    pub_done: AtomicUsize,
    warm_next: AtomicU64,
    next: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    pub_errors: AtomicU64,
    rx: Vec<Padded>,
    /// WebSocket closed loop only: deliveries per sequence, the count that completes one, how
    /// many are complete, and a wake-up for the publishers.
    per_seq: Vec<AtomicU32>,
    complete_target: AtomicU32,
    completed: AtomicU64,
    completed_notify: Notify,
    ws_stalls: AtomicU64,
}

/// A counter alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// What one worker thread gathered.
#[derive(Debug, Default)]
struct Gathered {
    uniques: Vec<u64>,
    dups: u64,
    stale: u64,
    last_rx_ns: u64,
    close_codes: BTreeMap<u16, u64>,
    slow_dropped: u64,
    slow_alive: u64,
    errors: BTreeMap<String, u64>,
}

/// Per-thread state shared by that thread's tasks.
#[derive(Debug)]
struct Local {
    index: usize,
    buf: RefCell<Vec<u8>>,
    hist: RefCell<Histogram>,
    gathered: RefCell<Gathered>,
    connect: Semaphore,
}

impl Local {
    fn error(&self, what: &str, err: &io::Error) {
        let mut text = format!("{what}: {err}");
        text.truncate(120);
        *self.gathered.borrow_mut().errors.entry(text).or_default() += 1;
    }
}

/// Runs `fanout`.
pub fn run_fanout(args: FanoutArgs, common: &Common) -> Result<Report, String> {
    run(args, 0, 4096, common)
}

/// Runs `slow`.
pub fn run_slow(args: SlowArgs, common: &Common) -> Result<Report, String> {
    if args.slow >= args.fanout.subscribers {
        return Err("--slow must be below --subscribers".into());
    }
    run(args.fanout, args.slow, args.slow_rcvbuf, common)
}

fn run(args: FanoutArgs, slow: usize, slow_rcvbuf: u32, common: &Common) -> Result<Report, String> {
    let threads = common.thread_count();
    let limit = crate::sys::raise_nofile_limit();
    let needed = (args.subscribers + args.pub_connections + 64) as u64;
    if needed > limit {
        return Err(format!(
            "{needed} file descriptors needed, the limit is {limit}"
        ));
    }
    let publish = match &args.pub_ws_url {
        Some(url) => {
            let (pre, post) = args
                .pub_ws_template
                .split_once("{payload}")
                .ok_or("--pub-ws-template must contain {payload}")?;
            Publish::Ws {
                url: Url::parse(url)?,
                pre: pre.as_bytes().to_vec(),
                post: post.as_bytes().to_vec(),
            }
        }
        None => Publish::Http(Url::parse(
            args.pub_url
                .as_deref()
                .ok_or("--pub-url or --pub-ws-url is required")?,
        )?),
    };
    let messages = match (args.rate, args.duration) {
        (Some(rate), Some(d)) => (rate * d.as_secs_f64()) as u64,
        _ => args.messages,
    };
    if messages == 0 || args.pub_connections == 0 || args.in_flight == 0 {
        return Err("--messages, --pub-connections and --in-flight must be above zero".into());
    }
    let ws_closed_loop = matches!(publish, Publish::Ws { .. }) && args.rate.is_none();
    let closed_loop = args.rate.is_none();
    let (phase, _) = watch::channel(CONNECT);
    let shared = Arc::new(Shared {
        sub_urls: args
            .sub_url
            .iter()
            .map(|url| Url::parse(url))
            .collect::<Result<_, _>>()?,
        publish,
        subscribers: args.subscribers,
        slow,
        slow_rcvbuf,
        messages,
        warmup: args.warmup,
        size: args.size,
        pub_connections: args.pub_connections,
        in_flight: args.in_flight,
        rate: args.rate,
        duration: args.duration,
        spread: common.spread,
        handshake_timeout: common.handshake_timeout,
        threads,
        connect_per_thread: args.connect_concurrency.div_ceil(threads).max(1),
        phase,
        run_start_ns: mono_ns(),
        measure_start_ns: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        slow_connected: AtomicUsize::new(0),
        closed_early: AtomicUsize::new(0),
        warm_ready: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        pub_ready: AtomicUsize::new(0),
        pub_failed: AtomicUsize::new(0),
        pub_done: AtomicUsize::new(0),
        warm_next: AtomicU64::new(0),
        next: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        pub_errors: AtomicU64::new(0),
        rx: (0..threads).map(|_| Padded::default()).collect(),
        per_seq: if ws_closed_loop {
            (0..messages).map(|_| AtomicU32::new(0)).collect()
        } else {
            Vec::new()
        },
        complete_target: AtomicU32::new(u32::MAX),
        completed: AtomicU64::new(0),
        completed_notify: Notify::new(),
        ws_stalls: AtomicU64::new(0),
    });

    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            spawn_worker(t, move |index| worker(index, shared))
        })
        .collect();

    let quiet = common.quiet;
    let mode = if slow > 0 { "slow" } else { "fanout" };
    let fast_total = args.subscribers - slow;
    let started = Instant::now();
    let connect_deadline =
        started + Duration::from_secs(30) + Duration::from_millis(args.subscribers as u64 * 2);
    let mut current = CONNECT;
    let mut phase_deadline = connect_deadline;
    let mut meter: Option<Meter> = None;
    let mut rss_before = None;
    let mut rss_peak = 0u64;
    let mut last_rss_sample = Instant::now();
    let mut drain_since: Option<Instant> = None;
    let mut warm_complete = true;
    let mut last_progress = Instant::now();
    let mut last_rx = 0u64;
    let mut measure_started = Instant::now();
    let (mut last_mark, mut last_change, mut stalled) = (0u64, Instant::now(), false);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = Instant::now();
        let connected = shared.connected.load(Relaxed);
        let failed = shared.failed.load(Relaxed);
        let slow_connected = shared.slow_connected.load(Relaxed);
        let closed_early = shared.closed_early.load(Relaxed);
        let rx: u64 = shared.rx.iter().map(|c| c.0.load(Relaxed)).sum();
        if let Some(pid) = common.server_pid
            && current >= WARMUP
            && now.duration_since(last_rss_sample) >= Duration::from_millis(200)
        {
            last_rss_sample = now;
            rss_peak = rss_peak.max(server_rss_bytes(pid).unwrap_or(0));
        }
        if now.duration_since(last_progress) >= Duration::from_secs(1) {
            let rate = (rx - last_rx) as f64 / now.duration_since(last_progress).as_secs_f64();
            last_progress = now;
            last_rx = rx;
            let name = ["connect", "warm-up", "measure", "stop"][current as usize];
            progress(
                quiet,
                &format!(
                    "[{mode}] {name} {:.0}s  subs {}/{} (failed {failed}, closed {closed_early}, slow {slow_connected})  published {}/{messages}  delivered {} ({}/s)",
                    started.elapsed().as_secs_f64(),
                    connected + slow_connected,
                    args.subscribers,
                    shared.sent.load(Relaxed),
                    human(rx as f64),
                    human(rate),
                ),
            );
        }
        match current {
            CONNECT => {
                let attempted = connected + failed + slow_connected >= args.subscribers;
                let pubs = shared.pub_ready.load(Relaxed) + shared.pub_failed.load(Relaxed)
                    >= args.pub_connections;
                if (attempted && pubs) || now >= phase_deadline {
                    if shared.pub_ready.load(Relaxed) == 0 {
                        shared.phase.send_replace(STOP);
                        join(workers);
                        progress_done(quiet);
                        return Err("no publish connection could be opened".into());
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    rss_before = common.server_pid.and_then(server_rss_bytes);
                    rss_peak = rss_before.unwrap_or(0);
                    current = WARMUP;
                    phase_deadline = Instant::now() + Duration::from_secs(10);
                    shared.phase.send_replace(WARMUP);
                }
            }
            WARMUP => {
                let ready = shared.warm_ready.load(Relaxed);
                if ready + closed_early >= connected || args.warmup == 0 || now >= phase_deadline {
                    warm_complete = ready + closed_early >= connected || args.warmup == 0;
                    let alive = (connected - closed_early) as u32;
                    shared.complete_target.store(alive.max(1), Relaxed);
                    meter = Some(Meter::start(common.server_pid));
                    shared.measure_start_ns.store(mono_ns(), Relaxed);
                    measure_started = Instant::now();
                    last_change = measure_started;
                    current = MEASURE;
                    shared.phase.send_replace(MEASURE);
                }
            }
            _ => {
                let publishing_over =
                    shared.pub_done.load(Relaxed) >= shared.pub_ready.load(Relaxed);
                // Everything published reached every subscriber still open (with --duration,
                // fewer than --messages were published, so count deliveries instead).
                let expected = match shared.publish {
                    Publish::Http(_) => shared.acked.load(Relaxed),
                    Publish::Ws { .. } => shared.sent.load(Relaxed),
                };
                let all_delivered = shared.done.load(Relaxed) + closed_early >= connected
                    || (publishing_over && rx >= expected * (connected - closed_early) as u64);
                if publishing_over && drain_since.is_none() {
                    drain_since = Some(now);
                }
                let drained =
                    drain_since.is_some_and(|t| now.duration_since(t) >= args.drain_timeout);
                let all_done = all_delivered && publishing_over;
                // Nothing delivered or acknowledged for a drain timeout: the server stalled.
                let progress_mark = rx + shared.acked.load(Relaxed) + shared.sent.load(Relaxed);
                if progress_mark != last_mark {
                    last_mark = progress_mark;
                    last_change = now;
                }
                if now.duration_since(last_change) >= args.drain_timeout {
                    stalled = !all_done && !drained;
                }
                if all_done || drained || stalled {
                    break;
                }
            }
        }
    }
    let measure_wall = measure_started.elapsed();
    let meter = meter.expect("measure phase started");
    let usage = meter.finish();
    let server_cpu = usage.server;
    let rss_after = common.server_pid.and_then(server_rss_bytes);
    shared.phase.send_replace(STOP);
    let gathered = join(workers);
    progress_done(quiet);

    // Results.
    let mut hist = Histogram::new();
    let mut all = Gathered::default();
    for (h, g) in gathered {
        hist.merge(&h);
        all.uniques.extend(g.uniques);
        all.dups += g.dups;
        all.stale += g.stale;
        all.last_rx_ns = all.last_rx_ns.max(g.last_rx_ns);
        for (code, n) in g.close_codes {
            *all.close_codes.entry(code).or_default() += n;
        }
        all.slow_dropped += g.slow_dropped;
        all.slow_alive += g.slow_alive;
        for (e, n) in g.errors {
            *all.errors.entry(e).or_default() += n;
        }
    }
    let sent = shared.sent.load(Relaxed);
    let acked = shared.acked.load(Relaxed);
    let expected_per_sub = match shared.publish {
        Publish::Http(_) => acked,
        Publish::Ws { .. } => sent,
    };
    let delivered: u64 = all.uniques.iter().sum();
    let lost: u64 = all
        .uniques
        .iter()
        .map(|&u| expected_per_sub.saturating_sub(u))
        .sum();
    let start_ns = shared.measure_start_ns.load(Relaxed);
    let window_s = if all.last_rx_ns > start_ns {
        (all.last_rx_ns - start_ns) as f64 / 1e9
    } else {
        measure_wall.as_secs_f64()
    };
    let connected = shared.connected.load(Relaxed);
    let slow_connected = shared.slow_connected.load(Relaxed);

    let mut report = Report::new(mode);
    report.set("subscribers", args.subscribers);
    if slow > 0 {
        report.set("slow_subscribers", slow);
    }
    report.set("size", args.size);
    report.set("messages", messages);
    report.set(
        "publish",
        match &shared.publish {
            Publish::Http(u) => format!("http {} x{}", u.path, args.pub_connections),
            Publish::Ws { url, .. } => format!("ws {} x{}", url.path, args.pub_connections),
        },
    );
    report.set(
        "loop",
        match args.rate {
            Some(r) => format!("open, {r} msgs/s"),
            None => format!("closed, {} in flight", args.in_flight),
        },
    );
    report.set("threads", threads);
    report.set("connected", connected + slow_connected);
    report.set(
        "connections_failed",
        shared.failed.load(Relaxed) + shared.pub_failed.load(Relaxed),
    );
    report.set("warmup_complete", warm_complete);
    report.set("published", sent);
    report.set("publish_acked", acked);
    report.set("publish_errors", shared.pub_errors.load(Relaxed));
    report.set(
        "expected_deliveries",
        expected_per_sub * all.uniques.len() as u64,
    );
    report.set("deliveries", delivered);
    report.set("lost", lost);
    report.set("duplicates", all.dups);
    report.set("stale_frames", all.stale);
    report.set("subscribers_closed", shared.closed_early.load(Relaxed));
    report.set(
        "close_codes",
        json!(
            all.close_codes
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect::<BTreeMap<_, _>>()
        ),
    );
    report.set_f("window_s", window_s, 3);
    report.set_f("deliveries_per_s", delivered as f64 / window_s, 0);
    report.set_f("publishes_per_s", sent as f64 / window_s, 0);
    report.latency("latency_ms", &hist);
    usage.add_to(&mut report, threads);
    if let Some(cpu) = server_cpu
        && delivered > 0
    {
        report.set_f(
            "server_cpu_s_per_million_deliveries",
            cpu / (delivered as f64 / 1e6),
            3,
        );
    }
    if slow > 0 {
        report.set("slow_connected", slow_connected);
        report.set("slow_dropped", all.slow_dropped);
        report.set("slow_still_open", all.slow_alive);
    }
    if let Some(before) = rss_before {
        report.set("server_rss_before", before);
        let after = rss_after.unwrap_or(0);
        report.set("server_rss_after", after);
        report.set("server_rss_peak", rss_peak.max(after));
        report.set(
            "server_rss_growth",
            rss_peak.max(after) as i64 - before as i64,
        );
    }
    if shared.ws_stalls.load(Relaxed) > 0 {
        report.set("ws_window_stalls", shared.ws_stalls.load(Relaxed));
    }
    if !all.errors.is_empty() {
        report.set("errors", json!(all.errors));
    }
    if closed_loop {
        report.note("closed loop: latency is each message's service time from its actual send (not coordinated-omission safe); use --rate for response time under a fixed load");
    } else {
        report.note(
            "open loop: latency measured from each message's intended send time (start + i/rate)",
        );
    }
    report.set("stalled", stalled);
    if stalled {
        report.note(format!(
            "stalled: nothing delivered or acknowledged for {:?}; the run was cut short",
            args.drain_timeout
        ));
    }
    if !warm_complete {
        report.note(
            "warm-up incomplete: not every subscriber received the warm-up publishes within 10 s",
        );
    }
    if fast_total > connected {
        report.note(format!(
            "{} subscribers failed to connect",
            fast_total - connected
        ));
    }
    Ok(report)
}

fn join(
    workers: Vec<std::thread::JoinHandle<(Histogram, Gathered)>>,
) -> Vec<(Histogram, Gathered)> {
    workers.into_iter().filter_map(|w| w.join().ok()).collect()
}

/// One worker thread: its share of the subscribers and of the publish connections.
async fn worker(index: usize, shared: Arc<Shared>) -> (Histogram, Gathered) {
    let local = Rc::new(Local {
        index,
        buf: RefCell::new(vec![0; 64 * 1024]),
        hist: RefCell::new(Histogram::new()),
        gathered: RefCell::new(Gathered::default()),
        connect: Semaphore::new(shared.connect_per_thread),
    });
    let mut tasks = Vec::new();
    for p in (index..shared.pub_connections).step_by(shared.threads) {
        let (shared, local) = (shared.clone(), local.clone());
        let cap = in_flight_share(&shared, p);
        tasks.push(tokio::task::spawn_local(async move {
            match &shared.publish {
                Publish::Http(_) => http_publisher(p, cap, &shared, &local).await,
                Publish::Ws { .. } => ws_publisher(p, &shared, &local).await,
            }
        }));
    }
    for i in (index..shared.subscribers).step_by(shared.threads) {
        let (shared, local) = (shared.clone(), local.clone());
        tasks.push(tokio::task::spawn_local(async move {
            if i < shared.slow {
                slow_subscriber(i, &shared, &local).await;
            } else {
                subscriber(i, &shared, &local).await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let hist = local.hist.replace(Histogram::new());
    let gathered = std::mem::take(&mut *local.gathered.borrow_mut());
    (hist, gathered)
}

/// Publish connection `p`'s share of the in-flight window.
fn in_flight_share(shared: &Shared, p: usize) -> usize {
    if shared.rate.is_some() {
        return OPEN_LOOP_PIPELINE;
    }
    let base = shared.in_flight / shared.pub_connections;
    (base + usize::from(p < shared.in_flight % shared.pub_connections)).max(1)
}

/// Connects and upgrades to `url`.
async fn open_ws(
    url: &Url,
    i: usize,
    rcvbuf: Option<u32>,
    shared: &Shared,
    local: &Local,
) -> io::Result<(TcpStream, Vec<u8>)> {
    let stream = open_tcp(url, i, rcvbuf, shared, local).await?;
    let leftover = ws::handshake(&stream, url, shared.handshake_timeout).await?;
    Ok((stream, leftover))
}

/// Connects (within the connect concurrency limit) from connection `i`'s source address.
async fn open_tcp(
    url: &Url,
    i: usize,
    rcvbuf: Option<u32>,
    shared: &Shared,
    local: &Local,
) -> io::Result<TcpStream> {
    let _permit = local.connect.acquire().await.map_err(io::Error::other)?;
    ws::connect(url.addr, spread_source(url.addr, i, shared.spread), rcvbuf).await
}

/// Waits until the phase is at least `at_least`; returns the phase reached.
pub async fn wait_phase(rx: &mut watch::Receiver<u8>, at_least: u8) -> u8 {
    match rx.wait_for(|p| *p >= at_least).await {
        Ok(p) => *p,
        Err(_) => STOP,
    }
}

/// A subscriber that reads everything: counts, checks and times each `hb:` message.
async fn subscriber(i: usize, shared: &Shared, local: &Local) {
    let url = shared.sub_urls[i % shared.sub_urls.len()].for_index(i);
    let (stream, leftover) = match open_ws(&url, i, None, shared, local).await {
        Ok(v) => v,
        Err(e) => {
            local.error("subscribe", &e);
            shared.failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.connected.fetch_add(1, Relaxed);
    let mut phase = shared.phase.subscribe();
    let m = shared.messages;
    let w = shared.warmup;
    let run_start = shared.run_start_ns;
    let mut bits = vec![0u64; m.div_ceil(64) as usize];
    let (mut unique, mut warm_seen, mut dups, mut stale) = (0u64, 0u64, 0u64, 0u64);
    let (mut done, mut warm_done) = (false, w == 0);
    let mut scanner = FrameScanner::new();
    let mut pong: Option<Vec<u8>> = None;
    let mut close: Option<u16> = None;
    let mut ended_by_server = false;
    if w == 0 {
        shared.warm_ready.fetch_add(1, Relaxed);
    }
    let mut pending = Some(leftover);
    loop {
        let from_socket = pending.is_none();
        if from_socket {
            tokio::select! {
                biased;
                r = stream.readable() => if r.is_err() { ended_by_server = true; break },
                _ = phase.changed() => {
                    if *phase.borrow() == STOP { break }
                    continue;
                }
            }
        }
        // Synchronous from here to the end of the block: the thread's read buffer and
        // histogram are borrowed only while no other task can run.
        let (now, got) = {
            let mut buf = local.buf.borrow_mut();
            let n = if let Some(left) = pending.take() {
                let n = left.len().min(buf.len());
                buf[..n].copy_from_slice(&left[..n]);
                n
            } else {
                match stream.try_read(&mut buf[..]) {
                    Ok(0) => {
                        ended_by_server = true;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        local.error("read", &e);
                        ended_by_server = true;
                        break;
                    }
                }
            };
            if from_socket {
                quickack(&stream);
            }
            let now = mono_ns();
            let mut hist = local.hist.borrow_mut();
            let mut got = 0u64;
            scanner.feed(&buf[..n], |opcode, payload, _len| match opcode {
                0..=2 => match ws::parse_marker(payload) {
                    Some((seq, sent)) if sent >= run_start && seq < m + w => {
                        if seq >= m {
                            warm_seen += 1;
                            return;
                        }
                        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                        if bits[word] & bit != 0 {
                            dups += 1;
                            return;
                        }
                        bits[word] |= bit;
                        unique += 1;
                        got += 1;
                        hist.record(now.saturating_sub(sent));
                        if let Some(count) = shared.per_seq.get(seq as usize)
                            && count.fetch_add(1, Relaxed) + 1
                                == shared.complete_target.load(Relaxed)
                        {
                            shared.completed.fetch_add(1, Relaxed);
                            shared.completed_notify.notify_waiters();
                        }
                    }
                    Some(_) => stale += 1,
                    None => {}
                },
                8 => {
                    close = Some(
                        payload
                            .get(..2)
                            .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                    )
                }
                9 => pong = Some(payload.to_vec()),
                _ => {}
            });
            (now, got)
        };
        if got > 0 {
            shared.rx[local.index].0.fetch_add(got, Relaxed);
            let mut g = local.gathered.borrow_mut();
            g.last_rx_ns = g.last_rx_ns.max(now);
        }
        if !warm_done && warm_seen >= w {
            warm_done = true;
            shared.warm_ready.fetch_add(1, Relaxed);
        }
        if !done && unique >= m {
            done = true;
            shared.done.fetch_add(1, Relaxed);
        }
        if let Some(payload) = pong.take() {
            let mut frame = Vec::with_capacity(payload.len() + 8);
            ws::push_masked(&mut frame, 0xA, &payload, rand::random());
            let _ = ws::write_all(&stream, &frame).await;
        }
        if let Some(code) = close {
            *local
                .gathered
                .borrow_mut()
                .close_codes
                .entry(code)
                .or_default() += 1;
            let _ = ws::write_all(&stream, &ws::close_frame()).await;
            ended_by_server = true;
            break;
        }
    }
    if ended_by_server && !done {
        shared.closed_early.fetch_add(1, Relaxed);
    }
    let mut g = local.gathered.borrow_mut();
    g.uniques.push(unique);
    g.dups += dups;
    g.stale += stale;
}

/// A subscriber that never reads (small receive buffer) until the run stops; then it drains
/// its socket to learn whether the server dropped it (EOF, reset or a close frame).
async fn slow_subscriber(i: usize, shared: &Shared, local: &Local) {
    let url = shared.sub_urls[i % shared.sub_urls.len()].for_index(i);
    let (stream, _) = match open_ws(&url, i, Some(shared.slow_rcvbuf), shared, local).await {
        Ok(v) => v,
        Err(e) => {
            local.error("slow subscribe", &e);
            shared.failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.slow_connected.fetch_add(1, Relaxed);
    let mut phase = shared.phase.subscribe();
    wait_phase(&mut phase, STOP).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut scanner = FrameScanner::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut dropped = false;
    loop {
        let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
        match tokio::time::timeout_at(quiet.min(deadline), stream.readable()).await {
            Err(_) => break,
            Ok(Err(_)) => {
                dropped = true;
                break;
            }
            Ok(Ok(())) => {}
        }
        match stream.try_read(&mut buf) {
            Ok(0) => {
                dropped = true;
                break;
            }
            Ok(n) => {
                let mut closed = None;
                scanner.feed(&buf[..n], |op, payload, _| {
                    if op == 8 {
                        closed = Some(
                            payload
                                .get(..2)
                                .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                        );
                    }
                });
                if let Some(code) = closed {
                    *local
                        .gathered
                        .borrow_mut()
                        .close_codes
                        .entry(code)
                        .or_default() += 1;
                    dropped = true;
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                dropped = true;
                break;
            }
        }
    }
    let mut g = local.gathered.borrow_mut();
    if dropped {
        g.slow_dropped += 1;
    } else {
        g.slow_alive += 1;
    }
}

/// What the publish loop needs from the transport.
struct Sender<'a> {
    shared: &'a Shared,
    stream: &'a TcpStream,
    in_flight: Cell<usize>,
    cap: usize,
    slot: Notify,
    /// HTTP: for each request in flight, whether it is a measured one (responses come in order).
    kinds: RefCell<VecDeque<bool>>,
    finished: Cell<bool>,
    wake_reader: Notify,
}

impl<'a> Sender<'a> {
    /// A sender on `stream` with at most `cap` publishes in flight.
    fn new(shared: &'a Shared, stream: &'a TcpStream, cap: usize) -> Self {
        Self {
            shared,
            stream,
            in_flight: Cell::new(0),
            cap,
            slot: Notify::new(),
            kinds: RefCell::new(VecDeque::new()),
            finished: Cell::new(false),
            wake_reader: Notify::new(),
        }
    }

    /// Appends one publish (HTTP request or WebSocket frame) for `seq` stamped `stamp`.
    fn push(&self, out: &mut Vec<u8>, scratch: &mut Vec<u8>, seq: u64, stamp: u64) {
        scratch.clear();
        match &self.shared.publish {
            Publish::Http(url) => {
                ws::push_payload(scratch, seq, stamp, self.shared.size);
                let mut digits = itoa::Buffer::new();
                out.extend_from_slice(b"POST ");
                out.extend_from_slice(url.path.as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
                out.extend_from_slice(url.host.as_bytes());
                out.extend_from_slice(b"\r\nContent-Type: text/plain\r\nContent-Length: ");
                out.extend_from_slice(digits.format(scratch.len()).as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(scratch);
            }
            Publish::Ws { pre, post, .. } => {
                scratch.extend_from_slice(pre);
                ws::push_payload(scratch, seq, stamp, self.shared.size);
                scratch.extend_from_slice(post);
                ws::push_masked(out, 0x1, scratch, rand::random());
            }
        }
    }

    /// Sends sequences taken from `counter` below `limit` (numbered from `base`) until they run
    /// out, the duration ends or the run stops. Returns false if the connection failed.
    async fn send_all(&self, counter: &AtomicU64, limit: u64, base: u64, measured: bool) -> bool {
        let shared = self.shared;
        let mut out = Vec::with_capacity(64 * 1024);
        let mut scratch = Vec::with_capacity(shared.size + 256);
        let start = shared.measure_start_ns.load(Relaxed);
        let deadline = shared.duration.map(|d| start + d.as_nanos() as u64);
        let is_ws = matches!(shared.publish, Publish::Ws { .. });
        let mut stop = shared.phase.subscribe();
        let mut stall_since: Option<Instant> = None;
        loop {
            if *stop.borrow_and_update() == STOP {
                return true;
            }
            // Closed loop over WebSocket: wait until fewer than in_flight measured messages
            // are short of a full delivery (a stall of 1 s opens the window anyway).
            if measured && is_ws && shared.rate.is_none() {
                loop {
                    let outstanding = shared.sent.load(Relaxed) - shared.completed.load(Relaxed);
                    if outstanding < shared.in_flight as u64 {
                        stall_since = None;
                        break;
                    }
                    let since = *stall_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(1) {
                        shared.ws_stalls.fetch_add(1, Relaxed);
                        stall_since = None;
                        break;
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_millis(2),
                        shared.completed_notify.notified(),
                    )
                    .await;
                }
            }
            while self.in_flight.get() >= self.cap {
                tokio::select! {
                    _ = self.slot.notified() => {}
                    _ = stop.changed() => return true,
                }
            }
            out.clear();
            let room = if is_ws && measured && shared.rate.is_none() {
                1
            } else if is_ws {
                64
            } else {
                self.cap - self.in_flight.get()
            };
            let mut batch = 0;
            let mut exhausted = false;
            while batch < room {
                let now = mono_ns();
                if measured && deadline.is_some_and(|d| now >= d) {
                    exhausted = true;
                    break;
                }
                let seq = counter.fetch_add(1, Relaxed);
                if seq >= limit {
                    exhausted = true;
                    break;
                }
                let stamp = match shared.rate {
                    Some(rate) if measured => {
                        let intended = start + (seq as f64 * 1e9 / rate) as u64;
                        if intended > now {
                            if !out.is_empty() && ws::write_all(self.stream, &out).await.is_err() {
                                return false;
                            }
                            out.clear();
                            tokio::time::sleep(Duration::from_nanos(intended - now)).await;
                        }
                        intended
                    }
                    _ => now,
                };
                self.push(&mut out, &mut scratch, base + seq, stamp);
                batch += 1;
                if !is_ws {
                    self.in_flight.set(self.in_flight.get() + 1);
                    self.kinds.borrow_mut().push_back(measured);
                }
                if measured {
                    shared.sent.fetch_add(1, Relaxed);
                }
            }
            if !out.is_empty() && ws::write_all(self.stream, &out).await.is_err() {
                return false;
            }
            if exhausted {
                return true;
            }
        }
    }

    /// Runs the warm-up and the measured publishes.
    async fn run(&self) {
        let shared = self.shared;
        let mut phase = shared.phase.subscribe();
        let ok = wait_phase(&mut phase, WARMUP).await < STOP
            && self
                .send_all(&shared.warm_next, shared.warmup, shared.messages, false)
                .await
            && wait_phase(&mut phase, MEASURE).await < STOP
            && self.send_all(&shared.next, shared.messages, 0, true).await;
        if !ok {
            shared.pub_errors.fetch_add(1, Relaxed);
        }
        // Wait for the responses still in flight, then tell the reader.
        while self.in_flight.get() > 0 && ok {
            tokio::select! {
                _ = self.slot.notified() => {}
                _ = phase.wait_for(|p| *p == STOP) => break,
            }
        }
        self.finished.set(true);
        self.wake_reader.notify_one();
    }
}

/// An HTTP keep-alive publish connection with pipelined requests (up to `cap` in flight).
async fn http_publisher(p: usize, cap: usize, shared: &Shared, local: &Local) {
    let Publish::Http(url) = &shared.publish else {
        return;
    };
    let stream = match open_tcp(url, p + 7, None, shared, local).await {
        Ok(stream) => stream,
        Err(e) => {
            local.error("publish connect", &e);
            shared.pub_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.pub_ready.fetch_add(1, Relaxed);
    let sender = Sender::new(shared, &stream, cap);
    let reader = async {
        let mut phase = shared.phase.subscribe();
        let ended = read_responses(
            &stream,
            &sender.wake_reader,
            &mut phase,
            || !sender.finished.get(),
            |_, status| {
                let measured = sender.kinds.borrow_mut().pop_front().unwrap_or(false);
                if measured {
                    if (200..300).contains(&status) {
                        shared.acked.fetch_add(1, Relaxed);
                    } else {
                        shared.pub_errors.fetch_add(1, Relaxed);
                    }
                }
                sender
                    .in_flight
                    .set(sender.in_flight.get().saturating_sub(1));
                sender.slot.notify_one();
            },
            |what, err| local.error(what, &io::Error::other(err.to_string())),
        )
        .await;
        if ended == ReadEnd::Unreadable {
            sender.finished.set(true);
        }
        // Nothing more will be answered: release a writer waiting for a slot.
        let lost = sender.in_flight.replace(0);
        if lost > 0 && !sender.finished.get() {
            shared.pub_errors.fetch_add(lost as u64, Relaxed);
        }
        sender.finished.set(true);
        sender.slot.notify_one();
    };
    tokio::join!(sender.run(), reader);
    shared.pub_done.fetch_add(1, Relaxed);
}

/// A WebSocket publish connection: sends text frames; drains whatever the server sends back.
async fn ws_publisher(p: usize, shared: &Shared, local: &Local) {
    let Publish::Ws { url, .. } = &shared.publish else {
        return;
    };
    let (stream, _) = match open_ws(url, p + 7, None, shared, local).await {
        Ok(v) => v,
        Err(e) => {
            local.error("publish connect", &e);
            shared.pub_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.pub_ready.fetch_add(1, Relaxed);
    let sender = Sender::new(shared, &stream, usize::MAX);
    let reader = async {
        let mut phase = shared.phase.subscribe();
        let mut scanner = FrameScanner::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                biased;
                r = stream.readable() => if r.is_err() { break },
                _ = phase.wait_for(|p| *p == STOP) => break,
            }
            match stream.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    quickack(&stream);
                    let mut pong = None;
                    scanner.feed(&chunk[..n], |op, payload, _| {
                        if op == 9 {
                            pong = Some(payload.to_vec());
                        }
                    });
                    if let Some(payload) = pong {
                        let mut frame = Vec::new();
                        ws::push_masked(&mut frame, 0xA, &payload, rand::random());
                        let _ = ws::write_all(&stream, &frame).await;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    };
    let writer = async {
        sender.run().await;
        shared.pub_done.fetch_add(1, Relaxed);
    };
    tokio::join!(writer, reader);
}

/// What ended [`read_responses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// Nothing more was expected, or the run stopped.
    Finished,
    /// The server closed the connection, or reading from it failed.
    Closed,
    /// A response did not parse.
    Unreadable,
}

/// Reads the pipelined HTTP/1.1 responses of a publisher connection while `more()` holds and
/// the run has not stopped, handing each complete response and its status to `on_response`.
/// `wake` makes it look at `more()` again; a closed connection, a failed read and a response
/// that does not parse go to `on_error` (with what failed) and end it.
pub async fn read_responses(
    stream: &TcpStream,
    wake: &Notify,
    phase: &mut watch::Receiver<u8>,
    more: impl Fn() -> bool,
    mut on_response: impl FnMut(&[u8], u16),
    mut on_error: impl FnMut(&'static str, &dyn std::fmt::Display),
) -> ReadEnd {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    while more() {
        tokio::select! {
            biased;
            r = stream.readable() => if r.is_err() { return ReadEnd::Closed },
            _ = wake.notified() => continue,
            _ = phase.wait_for(|p| *p == STOP) => return ReadEnd::Finished,
        }
        match stream.try_read(&mut chunk) {
            Ok(0) => {
                on_error("publish", &"server closed the connection");
                return ReadEnd::Closed;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                on_error("publish read", &e);
                return ReadEnd::Closed;
            }
        }
        quickack(stream);
        let mut used = 0;
        loop {
            match parse_response(&buf[used..]) {
                Ok(Some((len, status))) => {
                    on_response(&buf[used..used + len], status);
                    used += len;
                }
                Ok(None) => break,
                Err(e) => {
                    on_error("publish response", &e);
                    return ReadEnd::Unreadable;
                }
            }
        }
        buf.drain(..used);
    }
    ReadEnd::Finished
}

/// Parses one HTTP/1.1 response at the start of `b`: `(bytes, status)` once complete.
pub fn parse_response(b: &[u8]) -> Result<Option<(usize, u16)>, String> {
    let Some(head_end) = ws::find(b, b"\r\n\r\n") else {
        return if b.len() > 64 * 1024 {
            Err("response head too long".into())
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&b[..head_end]).map_err(|_| "non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            return Err("server closes the publish connection (Connection: close)".into());
        }
    }
    let body = head_end + 4;
    if chunked {
        let mut at = body;
        loop {
            let Some(line_end) = ws::find(&b[at..], b"\r\n") else {
                return Ok(None);
            };
            let size_text =
                std::str::from_utf8(&b[at..at + line_end]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            at += line_end + 2;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                let Some(end) = ws::find(&b[at..], b"\r\n") else {
                    return Ok(None);
                };
                return Ok(Some((at + end + 2, status)));
            }
            let next = at
                .checked_add(size)
                .and_then(|end| end.checked_add(2))
                .ok_or("bad chunk size")?;
            if b.len() < next {
                return Ok(None);
            }
            at = next;
        }
    }
    let total = body
        .checked_add(length.unwrap_or(0))
        .ok_or("bad content-length")?;
    Ok((b.len() >= total).then_some((total, status)))
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn responses() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 2";
        assert_eq!(parse_response(r).unwrap(), Some((40, 200)));
        assert_eq!(parse_response(&r[..30]).unwrap(), None);
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert_eq!(parse_response(c).unwrap(), Some((c.len(), 200)));
        assert_eq!(parse_response(&c[..c.len() - 1]).unwrap(), None);
    }

    #[test]
    fn sizes_that_overflow_are_errors_not_panics() {
        let chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nok";
        assert!(parse_response(chunk).is_err());
        let length = b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\n";
        assert!(parse_response(length).is_err());
    }
}

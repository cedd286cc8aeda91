//! `storm`: a reconnect storm against Herald's channel recovery. N clients subscribe to one
//! channel (json format) and keep their position (the epoch from the welcome or `subscribed`
//! frame, the offset of the last message received) while one HTTP keep-alive connection
//! publishes to the channel at a fixed rate for the whole run. After `--before` every client
//! drops its connection at once and reconnects with its position (`?channels=c&since=c:<epoch>:
//! <offset>` in the connect URL, or a `subscribe` request with `since`) while publishing goes on
//! for `--after`; then each client reads until it has the publisher's last offset.
//!
//! Each client keeps a bitmap of the offsets it got after the one it first subscribed at, so
//! loss, duplicates and out-of-order deliveries are exact; a client the server did not recover
//! (`"recovered":false`, with its `reason`) counts what it missed as lost. Times run from the
//! moment the clients drop: to the frame that says how the recovery went, and to the client
//! being caught up with live (it holds every offset up to the one that frame gave).
//!
//! Phases, driven by the main thread through a `watch` channel: connect every client, publish
//! (`--before`), drop and reconnect while publishing goes on (`--after`), drain (publishing is
//! over and its last offset known: clients read up to it, for at most `--drain-timeout`), stop.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};

use crate::fanout::{read_responses, wait_phase};
use crate::hist::Histogram;
use crate::report::{Report, human, progress, progress_done};
use crate::sys::{mono_ns, quickack, raise_nofile_limit, spread_source};
use crate::ws::{self, FrameScanner, Url};
use crate::{Common, Meter, spawn_worker};

/// Options of `storm`. It speaks Herald's recovery protocol (the welcome's and `subscribed`'s
/// epoch and offset, `since`), so it measures Herald only.
#[derive(Debug, Args, Clone)]
pub struct StormArgs {
    /// WebSocket URL, e.g. `ws://127.0.0.1:8080/ws` (`{i}` is replaced by the client's index);
    /// the channel, and on reconnect the position, are added to its query.
    #[arg(long)]
    pub url: String,
    /// Publish over HTTP POST to this URL (body = payload, content-type text/plain), e.g.
    /// `http://127.0.0.1:8080/api/publish/storm`; the reply's `offset` gives the last one.
    #[arg(long)]
    pub pub_url: String,
    /// The channel every client subscribes to (the one `--pub-url` publishes to).
    #[arg(long, default_value = "storm")]
    pub channel: String,
    /// Number of clients.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub clients: usize,
    /// Publishes per second, for the whole run (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Payload size in bytes (at least the marker's length).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// How long to publish before the clients drop.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// How long publishing goes on after the clients drop.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// How clients give their position back when they reconnect.
    #[arg(long, value_enum, default_value_t = Recover::Url)]
    pub recover: Recover,
    /// First connection attempts in progress at once (in total).
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Reconnections in progress at once (in total); 0: every client at once.
    #[arg(long, default_value_t = 0)]
    pub reconnect_concurrency: usize,
    /// After the last publish, how long clients may take to get up to it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// How a client subscribes, and gives its position back when it reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recover {
    /// `?channels=<c>` in the connect URL, and `&since=<c>:<epoch>:<offset>` on reconnect; the
    /// welcome frame says where the channel stands and how the recovery went.
    Url,
    /// A `subscribe` request after connecting, with `"since":{"epoch":..,"offset":..}` on
    /// reconnect; the `subscribed` reply says it.
    Subscribe,
}

const CONNECT: u8 = 0;
const PUBLISH: u8 = 1;
const DROP: u8 = 2;
const DRAIN: u8 = 3;
const STOP: u8 = 4;
/// Publish requests in flight on the publisher's connection at most (pipelined).
const PIPELINE: usize = 1024;
/// Offsets a client tracks past the one it subscribed at, beyond what the run publishes: more
/// means someone else publishes to the channel.
const SLACK: u64 = 1024;

/// Everything the threads share (read-mostly; counters are relaxed atomics).
#[derive(Debug)]
struct Shared {
    url: Url,
    publish: Url,
    channel: String,
    recover: Recover,
    clients: usize,
    rate: f64,
    size: usize,
    messages: u64,
    threads: usize,
    spread: usize,
    handshake_timeout: Duration,
    connect_per_thread: usize,
    reconnect_per_thread: Option<usize>,
    phase: watch::Sender<u8>,
    publish_start_ns: AtomicU64,
    drop_ns: AtomicU64,
    /// The publisher's last offset, set when the drain starts.
    last_offset: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    reconnected: AtomicUsize,
    rejoined: AtomicUsize,
    /// Connected clients that are done: up to the last offset, or their connection ended.
    finished: AtomicUsize,
    received: AtomicU64,
    pub_ready: AtomicUsize,
    pub_failed: AtomicUsize,
    pub_done: AtomicUsize,
    sent: AtomicU64,
    acked: AtomicU64,
    pub_errors: AtomicU64,
    max_offset: AtomicU64,
}

impl Shared {
    /// Client `i`'s connect URL: with the channel (and its position) in the query in the URL
    /// form, as given in the subscribe form.
    fn session_url(&self, i: usize, since: Option<&Position>) -> Url {
        let mut url = self.url.for_index(i);
        if self.recover == Recover::Url {
            let path = &mut url.path;
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("channels=");
            path.push_str(&self.channel);
            if let Some(position) = since {
                path.push_str(&format!(
                    "&since={}:{}:{}",
                    self.channel, position.epoch, position.offset
                ));
            }
        }
        url
    }

    /// The `subscribe` request of the subscribe form.
    fn subscribe_request(&self, since: Option<&Position>) -> String {
        let mut request = json!({"type": "subscribe", "channel": self.channel});
        if let Some(position) = since {
            request["since"] = json!({"epoch": position.epoch, "offset": position.offset});
        }
        request.to_string()
    }
}

/// Where a client stands in the channel's stream, as it gives it back on reconnect.
#[derive(Debug, Clone)]
struct Position {
    epoch: String,
    offset: u64,
}

/// What a welcome or `subscribed` frame says about the channel.
#[derive(Debug, Clone)]
struct Standing {
    epoch: String,
    offset: u64,
    recovered: Option<bool>,
    reason: Option<String>,
}

/// How a client ended up, for the totals.
#[derive(Debug)]
struct Outcome {
    /// The offset it first subscribed at: it expects every one after it.
    base: u64,
    /// Distinct offsets after `base` it got.
    unique: u64,
    /// `Some(recovered)` once it reconnected and was told how the recovery went.
    recovered: Option<bool>,
}

/// One client's record of what it got.
#[derive(Debug, Default)]
struct Track {
    base: u64,
    epoch: String,
    seen: Vec<u64>,
    highest: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    gaps: u64,
    replayed: u64,
    /// Offsets past anything the run publishes (another publisher on the channel).
    foreign: u64,
    limit: u64,
    /// The standing frame of the current connection, once it came.
    standing: Option<Standing>,
    /// The client is on its second connection.
    rejoined: bool,
    caught_up_ns: Option<u64>,
    close: Option<u16>,
    pong: Option<Vec<u8>>,
    error: Option<String>,
}

impl Track {
    /// The last offset the client has: its position.
    fn have(&self) -> u64 {
        self.base.max(self.highest)
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.have(),
        }
    }

    /// Takes one server frame (`payload` is its first [`ws::PREFIX`] bytes of `len`).
    fn on_frame(&mut self, opcode: u8, payload: &[u8], len: u64, channel: &str, recover: Recover) {
        match opcode {
            1 if payload.starts_with(br#"{"type":"message""#) => {
                match field_u64(payload, br#""offset":"#) {
                    Some(offset) => self.on_offset(offset),
                    None => self.fail("a message frame without an offset".into()),
                }
            }
            1 if payload.starts_with(br#"{"type":"welcome""#)
                || payload.starts_with(br#"{"type":"subscribed""#) =>
            {
                if len > payload.len() as u64 {
                    self.fail(format!("a standing frame over {} bytes", ws::PREFIX));
                    return;
                }
                match parse_standing(payload, channel) {
                    Ok(Some(standing)) => self.standing = Some(standing),
                    // The welcome of the subscribe form names no channel.
                    Ok(None) if recover == Recover::Subscribe => {}
                    Ok(None) => self.fail("the welcome does not name the channel".into()),
                    Err(e) => self.fail(e),
                }
            }
            1 if payload.starts_with(br#"{"type":"gap""#) => self.gaps += 1,
            1 if payload.starts_with(br#"{"type":"error""#) => {
                self.fail(String::from_utf8_lossy(payload).into_owned());
            }
            8 => {
                self.close = Some(
                    payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                );
            }
            9 => self.pong = Some(payload.to_vec()),
            _ => {}
        }
    }

    fn on_offset(&mut self, offset: u64) {
        if offset <= self.base {
            self.duplicates += 1;
            return;
        }
        let index = offset - self.base - 1;
        if index >= self.limit {
            self.foreign += 1;
            return;
        }
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        if offset < self.highest {
            self.out_of_order += 1;
        }
        self.highest = self.highest.max(offset);
        if self.rejoined
            && self
                .standing
                .as_ref()
                .is_some_and(|standing| offset <= standing.offset)
        {
            self.replayed += 1;
        }
    }

    /// Notes when the client, on its second connection, first holds every offset up to the
    /// one it was told there (nothing to wait for when it was not recovered).
    fn check_caught_up(&mut self, now: u64) {
        if self.caught_up_ns.is_some() {
            return;
        }
        if let Some(standing) = &self.standing
            && (standing.recovered != Some(true) || self.have() >= standing.offset)
        {
            self.caught_up_ns = Some(now);
        }
    }

    fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
    }
}

/// The digits after `key` in `b`.
fn field_u64(b: &[u8], key: &[u8]) -> Option<u64> {
    let start = ws::find(b, key)? + key.len();
    let digits = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&b[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

/// The channel's standing in a welcome (`"channels":{"<c>":{..}}`) or `subscribed` frame;
/// `None` when the frame does not name the channel.
fn parse_standing(frame: &[u8], channel: &str) -> Result<Option<Standing>, String> {
    let value: Value = serde_json::from_slice(frame)
        .map_err(|e| format!("a standing frame that is not JSON: {e}"))?;
    let at = match value["type"].as_str() {
        Some("welcome") => &value["channels"][channel],
        Some("subscribed") if value["channel"] == channel => &value,
        _ => &Value::Null,
    };
    if at.is_null() {
        return Ok(None);
    }
    let (Some(epoch), Some(offset)) = (at["epoch"].as_str(), at["offset"].as_u64()) else {
        return Err(format!(
            "no epoch and offset for the channel in {}",
            String::from_utf8_lossy(frame)
        ));
    };
    Ok(Some(Standing {
        epoch: epoch.to_owned(),
        offset,
        recovered: at["recovered"].as_bool(),
        reason: at["reason"].as_str().map(str::to_owned),
    }))
}

/// What one worker thread gathered.
#[derive(Debug, Default)]
struct Gathered {
    outcomes: Vec<Outcome>,
    duplicates: u64,
    out_of_order: u64,
    gaps: u64,
    replayed: u64,
    foreign: u64,
    epoch_changed: u64,
    reasons: BTreeMap<String, u64>,
    close_codes: BTreeMap<u16, u64>,
    caught_up_to_last: u64,
    last_upgrade_ns: u64,
    errors: BTreeMap<String, u64>,
}

/// Per-thread state shared by that thread's tasks.
#[derive(Debug)]
struct Local {
    buf: RefCell<Vec<u8>>,
    connect: Semaphore,
    reconnect: Option<Semaphore>,
    rejoin_hist: RefCell<Histogram>,
    caught_up_hist: RefCell<Histogram>,
    gathered: RefCell<Gathered>,
}

impl Local {
    fn error(&self, what: &str, err: &dyn std::fmt::Display) {
        let mut text = format!("{what}: {err}");
        text.truncate(160);
        *self.gathered.borrow_mut().errors.entry(text).or_default() += 1;
    }
}

/// Runs `storm`.
pub fn run(args: StormArgs, common: &Common) -> Result<Report, String> {
    if args.clients == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        return Err("--clients and --rate must be above zero (and --rate finite)".into());
    }
    let limit = raise_nofile_limit();
    let needed = (args.clients + 64) as u64;
    if needed > limit {
        return Err(format!(
            "{needed} file descriptors needed, the limit is {limit}"
        ));
    }
    let threads = common.thread_count();
    let messages = ((args.rate * (args.before + args.after).as_secs_f64()).ceil() as u64).max(1);
    let (phase, _) = watch::channel(CONNECT);
    let shared = Arc::new(Shared {
        url: Url::parse(&args.url)?,
        publish: Url::parse(&args.pub_url)?,
        channel: args.channel.clone(),
        recover: args.recover,
        clients: args.clients,
        rate: args.rate,
        size: args.size,
        messages,
        threads,
        spread: common.spread,
        handshake_timeout: common.handshake_timeout,
        connect_per_thread: args.connect_concurrency.div_ceil(threads).max(1),
        reconnect_per_thread: (args.reconnect_concurrency > 0)
            .then(|| args.reconnect_concurrency.div_ceil(threads).max(1)),
        phase,
        publish_start_ns: AtomicU64::new(0),
        drop_ns: AtomicU64::new(0),
        last_offset: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        reconnected: AtomicUsize::new(0),
        rejoined: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        pub_ready: AtomicUsize::new(0),
        pub_failed: AtomicUsize::new(0),
        pub_done: AtomicUsize::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        pub_errors: AtomicU64::new(0),
        max_offset: AtomicU64::new(0),
    });
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let shared = shared.clone();
            spawn_worker(t, move |index| worker(index, shared))
        })
        .collect();

    let quiet = common.quiet;
    let started = Instant::now();
    let mut current = CONNECT;
    let mut deadline =
        started + Duration::from_secs(30) + Duration::from_millis(args.clients as u64 * 2);
    let mut meter: Option<Meter> = None;
    let mut publish_incomplete = false;
    let mut drain_timed_out = false;
    let mut last_progress = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = Instant::now();
        let connected = shared.connected.load(Relaxed);
        let failed = shared.failed.load(Relaxed);
        if now.duration_since(last_progress) >= Duration::from_secs(1) {
            last_progress = now;
            let name = ["connect", "publish", "reconnect", "drain", "stop"][current as usize];
            progress(
                quiet,
                &format!(
                    "[storm] {name} {:.0}s  clients {connected}/{} (failed {failed})  reconnected {}  rejoined {}  published {}/{messages}  received {}",
                    started.elapsed().as_secs_f64(),
                    args.clients,
                    shared.reconnected.load(Relaxed),
                    shared.rejoined.load(Relaxed),
                    shared.sent.load(Relaxed),
                    human(shared.received.load(Relaxed) as f64),
                ),
            );
        }
        match current {
            CONNECT => {
                let attempted = connected + failed >= args.clients;
                let publisher =
                    shared.pub_ready.load(Relaxed) + shared.pub_failed.load(Relaxed) >= 1;
                if (attempted && publisher) || now >= deadline {
                    let reason = if shared.pub_ready.load(Relaxed) == 0 {
                        Some("the publish connection could not be opened")
                    } else if connected == 0 {
                        Some("no client could connect and subscribe")
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        shared.phase.send_replace(STOP);
                        let mut errors = BTreeMap::new();
                        for (_, _, g) in join(workers) {
                            errors.extend(g.errors);
                        }
                        progress_done(quiet);
                        return Err(format!("{reason}: {errors:?}"));
                    }
                    shared.publish_start_ns.store(mono_ns(), Relaxed);
                    current = PUBLISH;
                    deadline = now + args.before;
                    shared.phase.send_replace(PUBLISH);
                }
            }
            PUBLISH => {
                if now >= deadline {
                    meter = Some(Meter::start(common.server_pid));
                    shared.drop_ns.store(mono_ns(), Relaxed);
                    current = DROP;
                    // Publishing ends by itself after `after`; allow for the replies.
                    deadline = now + args.after + args.drain_timeout;
                    shared.phase.send_replace(DROP);
                }
            }
            DROP => {
                let published = shared.pub_done.load(Relaxed) > 0;
                if published || now >= deadline {
                    publish_incomplete = !published;
                    shared
                        .last_offset
                        .store(shared.max_offset.load(Relaxed), Relaxed);
                    current = DRAIN;
                    deadline = now + args.drain_timeout;
                    shared.phase.send_replace(DRAIN);
                }
            }
            _ => {
                if shared.finished.load(Relaxed) >= connected {
                    break;
                }
                if now >= deadline {
                    drain_timed_out = true;
                    break;
                }
            }
        }
    }
    let usage = meter.expect("the storm started").finish();
    shared.phase.send_replace(STOP);
    let gathered = join(workers);
    progress_done(quiet);

    let mut rejoin_hist = Histogram::new();
    let mut caught_up_hist = Histogram::new();
    let mut all = Gathered::default();
    for (rejoin, caught_up, g) in gathered {
        rejoin_hist.merge(&rejoin);
        caught_up_hist.merge(&caught_up);
        all.outcomes.extend(g.outcomes);
        all.duplicates += g.duplicates;
        all.out_of_order += g.out_of_order;
        all.gaps += g.gaps;
        all.replayed += g.replayed;
        all.foreign += g.foreign;
        all.epoch_changed += g.epoch_changed;
        for (reason, n) in g.reasons {
            *all.reasons.entry(reason).or_default() += n;
        }
        for (code, n) in g.close_codes {
            *all.close_codes.entry(code).or_default() += n;
        }
        all.caught_up_to_last += g.caught_up_to_last;
        all.last_upgrade_ns = all.last_upgrade_ns.max(g.last_upgrade_ns);
        for (e, n) in g.errors {
            *all.errors.entry(e).or_default() += n;
        }
    }
    let last = shared.last_offset.load(Relaxed);
    let (mut expected, mut delivered) = (0u64, 0u64);
    let (mut lost_recovered, mut lost_unrecovered, mut lost_not_rejoined) = (0u64, 0u64, 0u64);
    let (mut recovered, mut unrecovered) = (0usize, 0usize);
    for outcome in &all.outcomes {
        let owed = last.saturating_sub(outcome.base);
        let lost = owed.saturating_sub(outcome.unique);
        expected += owed;
        delivered += outcome.unique.min(owed);
        match outcome.recovered {
            Some(true) => {
                recovered += 1;
                lost_recovered += lost;
            }
            Some(false) => {
                unrecovered += 1;
                lost_unrecovered += lost;
            }
            None => lost_not_rejoined += lost,
        }
    }
    let drop_ns = shared.drop_ns.load(Relaxed);
    let reconnected = shared.reconnected.load(Relaxed);
    let connected = shared.connected.load(Relaxed);
    let reconnect_s = all.last_upgrade_ns.saturating_sub(drop_ns) as f64 / 1e9;

    let mut report = Report::new("storm");
    report.set("clients", args.clients);
    report.set("channel", args.channel.as_str());
    report.set(
        "recover",
        match args.recover {
            Recover::Url => "url",
            Recover::Subscribe => "subscribe",
        },
    );
    report.set("rate", args.rate);
    report.set("size", args.size);
    report.set_f("before_s", args.before.as_secs_f64(), 3);
    report.set_f("after_s", args.after.as_secs_f64(), 3);
    report.set("threads", threads);
    report.set("connected", connected);
    report.set("connections_failed", shared.failed.load(Relaxed));
    report.set("published", shared.sent.load(Relaxed));
    report.set("publish_acked", shared.acked.load(Relaxed));
    report.set("publish_errors", shared.pub_errors.load(Relaxed));
    report.set(
        "first_offset",
        all.outcomes.iter().map(|o| o.base).min().unwrap_or(0),
    );
    report.set("last_offset", last);
    report.set("reconnected", reconnected);
    report.set("reconnect_failed", connected.saturating_sub(reconnected));
    report.set("rejoined", shared.rejoined.load(Relaxed));
    report.set("recovered", recovered);
    report.set("unrecovered", unrecovered);
    report.set("unrecovered_reasons", json!(all.reasons));
    report.set("expected_deliveries", expected);
    report.set("deliveries", delivered);
    report.set("replayed", all.replayed);
    report.set(
        "lost",
        lost_recovered + lost_unrecovered + lost_not_rejoined,
    );
    report.set("lost_recovered", lost_recovered);
    report.set("lost_unrecovered", lost_unrecovered);
    report.set("lost_not_rejoined", lost_not_rejoined);
    report.set("duplicates", all.duplicates);
    report.set("out_of_order", all.out_of_order);
    report.set("gaps", all.gaps);
    report.set("epoch_changed", all.epoch_changed);
    report.set("caught_up_to_last", all.caught_up_to_last);
    report.set(
        "close_codes",
        json!(
            all.close_codes
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect::<BTreeMap<_, _>>()
        ),
    );
    report.set_f("reconnect_s", reconnect_s, 3);
    if reconnect_s > 0.0 {
        report.set_f("reconnects_per_s", reconnected as f64 / reconnect_s, 0);
    }
    report.latency("rejoined_ms", &rejoin_hist);
    report.latency("caught_up_ms", &caught_up_hist);
    usage.add_to(&mut report, threads);
    if all.foreign > 0 {
        report.set("foreign_offsets", all.foreign);
        report.note("offsets past everything this run published arrived: something else publishes to the channel, and the counts are off");
    }
    if !all.errors.is_empty() {
        report.set("errors", json!(all.errors));
    }
    report.set("drain_timed_out", drain_timed_out);
    report.note("lost: offsets after the one a client first subscribed at, up to last_offset, that it never got; a client not recovered counts what it missed");
    report.note("rejoined_ms: from the drop to the frame saying how the recovery went (welcome or subscribed); caught_up_ms: to holding every offset up to the one that frame gave; reconnects_per_s: reconnected / (drop to the last upgrade done)");
    report.note("server CPU and bench CPU are measured from the drop to the end of the drain");
    if publish_incomplete {
        report.note("publishing did not finish (replies missing) within --after + --drain-timeout; last_offset is the highest one acknowledged");
    }
    if drain_timed_out {
        report.note(format!(
            "drain timed out: {} clients had not got the last offset after {:?}",
            connected.saturating_sub(shared.finished.load(Relaxed)),
            args.drain_timeout
        ));
    }
    Ok(report)
}

type Joined = (Histogram, Histogram, Gathered);

fn join(workers: Vec<std::thread::JoinHandle<Joined>>) -> Vec<Joined> {
    workers.into_iter().filter_map(|w| w.join().ok()).collect()
}

/// One worker thread: its share of the clients, and the publisher on thread 0.
async fn worker(index: usize, shared: Arc<Shared>) -> Joined {
    let local = Rc::new(Local {
        buf: RefCell::new(vec![0; 64 * 1024]),
        connect: Semaphore::new(shared.connect_per_thread),
        reconnect: shared.reconnect_per_thread.map(Semaphore::new),
        rejoin_hist: RefCell::new(Histogram::new()),
        caught_up_hist: RefCell::new(Histogram::new()),
        gathered: RefCell::new(Gathered::default()),
    });
    let mut tasks = Vec::new();
    if index == 0 {
        let (shared, local) = (shared.clone(), local.clone());
        tasks.push(tokio::task::spawn_local(async move {
            publisher(&shared, &local).await;
        }));
    }
    for i in (index..shared.clients).step_by(shared.threads) {
        let (shared, local) = (shared.clone(), local.clone());
        tasks.push(tokio::task::spawn_local(async move {
            client(i, &shared, &local).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let rejoin = local.rejoin_hist.replace(Histogram::new());
    let caught_up = local.caught_up_hist.replace(Histogram::new());
    let gathered = std::mem::take(&mut *local.gathered.borrow_mut());
    (rejoin, caught_up, gathered)
}

/// One connection of a client.
struct Session {
    stream: TcpStream,
    pending: Option<Vec<u8>>,
    scanner: FrameScanner,
}

/// How reading a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The condition it read for was met.
    Met,
    /// The run stopped.
    Stopped,
    /// The server closed the connection (or it failed), or sent something unexpected.
    Closed,
}

/// Connects client `i` (holding a permit of `limit`, if any, until the upgrade is done) and
/// subscribes the subscribe form's way.
async fn open_session(
    i: usize,
    since: Option<&Position>,
    shared: &Shared,
    limit: Option<&Semaphore>,
) -> io::Result<Session> {
    let url = shared.session_url(i, since);
    let permit = match limit {
        Some(semaphore) => Some(semaphore.acquire().await.map_err(io::Error::other)?),
        None => None,
    };
    let stream = ws::connect(url.addr, spread_source(url.addr, i, shared.spread), None).await?;
    let leftover = ws::handshake(&stream, &url, shared.handshake_timeout).await?;
    drop(permit);
    if shared.recover == Recover::Subscribe {
        let mut frame = Vec::new();
        let request = shared.subscribe_request(since);
        ws::push_masked(&mut frame, 0x1, request.as_bytes(), rand::random());
        ws::write_all(&stream, &frame).await?;
    }
    Ok(Session {
        stream,
        pending: (!leftover.is_empty()).then_some(leftover),
        scanner: FrameScanner::new(),
    })
}

/// Reads `session` into `track` until `until(track, phase, now)` holds (checked after every
/// read), the run stops or the connection ends.
async fn read_until(
    session: &mut Session,
    track: &mut Track,
    shared: &Shared,
    local: &Local,
    phase: &mut watch::Receiver<u8>,
    mut until: impl FnMut(&mut Track, u8, u64) -> bool,
) -> Ended {
    loop {
        let current = *phase.borrow_and_update();
        if current == STOP {
            return Ended::Stopped;
        }
        if track.error.is_some() || track.close.is_some() {
            return Ended::Closed;
        }
        if until(track, current, mono_ns()) {
            return Ended::Met;
        }
        if session.pending.is_none() {
            tokio::select! {
                biased;
                r = session.stream.readable() => if r.is_err() { return Ended::Closed },
                changed = phase.changed() => {
                    if changed.is_err() { return Ended::Stopped }
                    continue;
                }
            }
        }
        // Synchronous from here to the end of the block: the thread's read buffer is borrowed
        // only while no other task can run.
        let before = track.unique;
        {
            let mut buf = local.buf.borrow_mut();
            let n = if let Some(left) = session.pending.take() {
                let n = left.len().min(buf.len());
                buf[..n].copy_from_slice(&left[..n]);
                n
            } else {
                match session.stream.try_read(&mut buf[..]) {
                    Ok(0) => return Ended::Closed,
                    Ok(n) => {
                        quickack(&session.stream);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        track.fail(format!("read: {e}"));
                        return Ended::Closed;
                    }
                }
            };
            let (channel, recover) = (shared.channel.as_str(), shared.recover);
            session.scanner.feed(&buf[..n], |opcode, payload, len| {
                track.on_frame(opcode, payload, len, channel, recover);
            });
        }
        shared.received.fetch_add(track.unique - before, Relaxed);
        if let Some(payload) = track.pong.take() {
            let mut frame = Vec::with_capacity(payload.len() + 8);
            ws::push_masked(&mut frame, 0xA, &payload, rand::random());
            let _ = ws::write_all(&session.stream, &frame).await;
        }
        if track.close.is_some() {
            let _ = ws::write_all(&session.stream, &ws::close_frame()).await;
        }
    }
}

/// One client: subscribe, follow the channel until the drop, reconnect with its position,
/// read up to the publisher's last offset, then hold the connection until the run stops.
async fn client(i: usize, shared: &Shared, local: &Local) {
    let mut phase = shared.phase.subscribe();
    let mut track = Track::default();
    let mut first = match open_session(i, None, shared, Some(&local.connect)).await {
        Ok(session) => session,
        Err(e) => {
            local.error("connect", &e);
            shared.failed.fetch_add(1, Relaxed);
            return;
        }
    };
    let ended = read_until(
        &mut first,
        &mut track,
        shared,
        local,
        &mut phase,
        |t, _, _| t.standing.is_some(),
    )
    .await;
    let Some(standing) = track.standing.take().filter(|_| ended == Ended::Met) else {
        local.error(
            "subscribe",
            &track
                .error
                .as_deref()
                .unwrap_or("no welcome or subscribed frame"),
        );
        shared.failed.fetch_add(1, Relaxed);
        return;
    };
    track.base = standing.offset;
    track.epoch = standing.epoch;
    track.limit = shared.messages + SLACK;
    shared.connected.fetch_add(1, Relaxed);
    let finish = |track: &Track, recovered: Option<bool>| {
        shared.finished.fetch_add(1, Relaxed);
        let mut g = local.gathered.borrow_mut();
        g.outcomes.push(Outcome {
            base: track.base,
            unique: track.unique,
            recovered,
        });
        g.duplicates += track.duplicates;
        g.out_of_order += track.out_of_order;
        g.gaps += track.gaps;
        g.replayed += track.replayed;
        g.foreign += track.foreign;
        if let Some(code) = track.close {
            *g.close_codes.entry(code).or_default() += 1;
        }
        if let Some(error) = &track.error {
            let mut text = format!("client: {error}");
            text.truncate(160);
            *g.errors.entry(text).or_default() += 1;
        }
    };

    // Until the drop. A client the server closed first reconnects with the others.
    let ended = read_until(
        &mut first,
        &mut track,
        shared,
        local,
        &mut phase,
        |_, p, _| p >= DROP,
    )
    .await;
    drop(first);
    if ended == Ended::Stopped || wait_phase(&mut phase, DROP).await >= STOP {
        finish(&track, None);
        return;
    }
    // Every client is here within a few milliseconds of the others.
    let position = track.position();
    if let Some(code) = track.close.take() {
        *local
            .gathered
            .borrow_mut()
            .close_codes
            .entry(code)
            .or_default() += 1;
    }
    track.error = None;
    track.rejoined = true;
    let mut second = match open_session(i, Some(&position), shared, local.reconnect.as_ref()).await
    {
        Ok(session) => session,
        Err(e) => {
            local.error("reconnect", &e);
            finish(&track, None);
            return;
        }
    };
    {
        let mut g = local.gathered.borrow_mut();
        g.last_upgrade_ns = g.last_upgrade_ns.max(mono_ns());
    }
    shared.reconnected.fetch_add(1, Relaxed);
    let drop_ns = shared.drop_ns.load(Relaxed);
    let ended = read_until(
        &mut second,
        &mut track,
        shared,
        local,
        &mut phase,
        |t, _, _| t.standing.is_some(),
    )
    .await;
    let Some(standing) = track.standing.clone().filter(|_| ended == Ended::Met) else {
        finish(&track, None);
        return;
    };
    shared.rejoined.fetch_add(1, Relaxed);
    local
        .rejoin_hist
        .borrow_mut()
        .record(mono_ns().saturating_sub(drop_ns));
    let recovered = standing.recovered == Some(true);
    {
        let mut g = local.gathered.borrow_mut();
        if standing.epoch != position.epoch {
            g.epoch_changed += 1;
        }
        if !recovered {
            let reason = standing
                .reason
                .clone()
                .unwrap_or_else(|| "none given".into());
            *g.reasons.entry(reason).or_default() += 1;
        }
    }
    let ended = read_until(
        &mut second,
        &mut track,
        shared,
        local,
        &mut phase,
        |t, p, now| {
            t.check_caught_up(now);
            p >= DRAIN && t.have() >= shared.last_offset.load(Relaxed)
        },
    )
    .await;
    if let Some(at) = track.caught_up_ns {
        local
            .caught_up_hist
            .borrow_mut()
            .record(at.saturating_sub(drop_ns));
    }
    if ended == Ended::Met {
        local.gathered.borrow_mut().caught_up_to_last += 1;
        finish(&track, Some(recovered));
        // Stay connected (answering pings) until the run stops, so that closes do not land
        // on the server while other clients still catch up.
        read_until(
            &mut second,
            &mut track,
            shared,
            local,
            &mut phase,
            |_, _, _| false,
        )
        .await;
    } else {
        finish(&track, Some(recovered));
    }
}

/// The publisher: one HTTP keep-alive connection, requests pipelined, open loop at `--rate`
/// from the start of publishing for `--before` + `--after`; it notes the highest offset the
/// replies give.
async fn publisher(shared: &Shared, local: &Local) {
    let url = &shared.publish;
    let stream = match ws::connect(url.addr, spread_source(url.addr, 0, shared.spread), None).await
    {
        Ok(stream) => stream,
        Err(e) => {
            local.error("publish connect", &e);
            shared.pub_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    shared.pub_ready.fetch_add(1, Relaxed);
    let mut phase = shared.phase.subscribe();
    if wait_phase(&mut phase, PUBLISH).await >= STOP {
        return;
    }
    let in_flight = Cell::new(0usize);
    let writing = Cell::new(true);
    let slot = Notify::new();
    let wake_reader = Notify::new();
    let writer = async {
        let start = shared.publish_start_ns.load(Relaxed);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut body = Vec::with_capacity(shared.size + 64);
        let mut digits = itoa::Buffer::new();
        let mut seq = 0;
        let mut stop = shared.phase.subscribe();
        while seq < shared.messages && *stop.borrow_and_update() != STOP {
            let intended = start + (seq as f64 * 1e9 / shared.rate) as u64;
            let now = mono_ns();
            if intended > now {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_nanos(intended - now)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            while in_flight.get() >= PIPELINE {
                slot.notified().await;
            }
            out.clear();
            body.clear();
            ws::push_payload(&mut body, seq, intended, shared.size);
            out.extend_from_slice(b"POST ");
            out.extend_from_slice(url.path.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
            out.extend_from_slice(url.host.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: text/plain\r\nContent-Length: ");
            out.extend_from_slice(digits.format(body.len()).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&body);
            in_flight.set(in_flight.get() + 1);
            shared.sent.fetch_add(1, Relaxed);
            seq += 1;
            if let Err(e) = ws::write_all(&stream, &out).await {
                local.error("publish write", &e);
                break;
            }
        }
        writing.set(false);
        wake_reader.notify_one();
    };
    let reader = async {
        read_responses(
            &stream,
            &wake_reader,
            &mut phase,
            || writing.get() || in_flight.get() > 0,
            |response, status| {
                match field_u64(response, br#""offset":"#) {
                    Some(offset) if (200..300).contains(&status) => {
                        shared.acked.fetch_add(1, Relaxed);
                        shared.max_offset.fetch_max(offset, Relaxed);
                    }
                    _ => {
                        shared.pub_errors.fetch_add(1, Relaxed);
                    }
                }
                in_flight.set(in_flight.get().saturating_sub(1));
                slot.notify_one();
            },
            |what, err| local.error(what, err),
        )
        .await;
        // Nothing more will be answered: release a writer waiting for a slot.
        let lost = in_flight.replace(0);
        shared.pub_errors.fetch_add(lost as u64, Relaxed);
        slot.notify_one();
    };
    tokio::join!(writer, reader);
    shared.pub_done.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standings_from_welcome_and_subscribed() {
        let welcome = br#"{"type":"welcome","client_id":"c-1","channels":{"s":{"epoch":"abcd1234","offset":7,"recovered":false,"reason":"position_expired"}}}"#;
        let standing = parse_standing(welcome, "s").unwrap().unwrap();
        assert_eq!((standing.epoch.as_str(), standing.offset), ("abcd1234", 7));
        assert_eq!(standing.recovered, Some(false));
        assert_eq!(standing.reason.as_deref(), Some("position_expired"));
        assert!(parse_standing(welcome, "other").unwrap().is_none());
        let bare = br#"{"type":"welcome","client_id":"c-1"}"#;
        assert!(parse_standing(bare, "s").unwrap().is_none());
        let subscribed =
            br#"{"type":"subscribed","channel":"s","epoch":"abcd1234","offset":9,"recovered":true}"#;
        let standing = parse_standing(subscribed, "s").unwrap().unwrap();
        assert_eq!((standing.offset, standing.recovered), (9, Some(true)));
        assert!(parse_standing(br#"{"type":"welcome","channels":{"s":{}}}"#, "s").is_err());
    }

    #[test]
    fn tracking_counts_loss_duplicates_and_order() {
        let mut track = Track {
            base: 10,
            limit: 100,
            ..Track::default()
        };
        for offset in [11, 12, 14, 13, 13, 10, 500] {
            track.on_offset(offset);
        }
        assert_eq!(track.unique, 4);
        assert_eq!(
            track.duplicates, 2,
            "13 again, and 10 (the position itself)"
        );
        assert_eq!(track.out_of_order, 1, "13 after 14");
        assert_eq!(track.foreign, 1);
        assert_eq!(track.have(), 14);
        let message = br#"{"type":"message","channel":"s","offset":15,"data":"hb:1:2:"}"#;
        track.on_frame(1, message, message.len() as u64, "s", Recover::Url);
        assert_eq!(track.have(), 15);
    }
}

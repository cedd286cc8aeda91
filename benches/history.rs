//! What channel history costs a publish on the in-memory broker: the same 64-byte publish with
//! `history_size(100)` and `history_size(0)`, to a channel with no subscriber (the publish call
//! alone: with history off it does not even build the frame) and to one with 1k subscribers
//! (the fan-out into their outboxes included, as in `fanout`); and the eviction path, with a
//! `history_memory` so small that every publish evicts, next to one channel and with 10k other
//! channels in the table (an eviction pass visits every channel).
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use herald::Config;
use herald::protocol::Payload;
use herald::registry::{Format, Outbox, Registry};
use tokio::runtime::Runtime;

/// The text every publish carries: 64 bytes, as in `fanout`.
const PAYLOAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// A history budget below two stored messages of [`PAYLOAD`] on channel `bench` (a frame of
/// about 115 bytes plus the entry): every publish takes the histories past it and evicts one.
const EVICT_EVERY_PUBLISH: u64 = 256;

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A 2-shard registry whose channels keep `history` messages within `memory` bytes.
fn registry(runtime: &Runtime, history: usize, memory: u64) -> Registry {
    let config = Config::default()
        .shards(2)
        .queue_capacity(64)
        .history_size(history)
        .history_memory(memory);
    runtime.block_on(async { Registry::new(&config) })
}

/// `iters` publishes to `channel`, timed in one `block_on` so that entering the runtime is not
/// part of the cost.
fn publish_loop(runtime: &Runtime, registry: &Registry, channel: &str, iters: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            registry
                .publish(channel, None, Payload::Text(PAYLOAD))
                .await
                .expect("publish");
        }
        start.elapsed()
    })
}

/// Registers `subscribers` connections on `channel` and returns their outboxes.
fn subscribe_all(registry: &Registry, channel: &str, subscribers: usize) -> Vec<Arc<Outbox>> {
    (0..subscribers)
        .map(|i| {
            let registration =
                registry.register(Arc::from(format!("c{i}")), Format::Json, None, false);
            registry
                .subscribe(registration.id, channel)
                .expect("subscribe");
            registration.outbox
        })
        .collect()
}

fn no_subscribers(c: &mut Criterion) {
    let runtime = runtime(1);
    let mut group = c.benchmark_group("history/publish, 0 subscribers");
    group.measurement_time(Duration::from_secs(3));
    for history in [100, 0] {
        let registry = registry(&runtime, history, 64 << 20);
        let id = BenchmarkId::from_parameter(format!("history {history}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| publish_loop(&runtime, &registry, "bench", iters));
        });
    }
    group.finish();
}

fn subscribers(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 1_000;
    let runtime = runtime(2);
    let mut group = c.benchmark_group("history/publish, 1k subscribers");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for history in [100, 0] {
        let registry = registry(&runtime, history, 64 << 20);
        let outboxes = subscribe_all(&registry, "bench", SUBSCRIBERS);
        let id = BenchmarkId::from_parameter(format!("history {history}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let target = registry.metrics().deliveries.get() + SUBSCRIBERS as u64;
                    let start = Instant::now();
                    runtime.block_on(async {
                        registry
                            .publish("bench", None, Payload::Text(PAYLOAD))
                            .await
                            .expect("publish");
                        while registry.metrics().deliveries.get() < target {
                            tokio::task::yield_now().await;
                        }
                    });
                    elapsed += start.elapsed();
                    for outbox in &outboxes {
                        outbox.clear();
                    }
                }
                elapsed
            });
        });
    }
    group.finish();
}

fn eviction(c: &mut Criterion) {
    let runtime = runtime(1);
    let mut group = c.benchmark_group("history/publish, every publish evicts");
    group.measurement_time(Duration::from_secs(3));
    for others in [0, 10_000] {
        let registry = registry(&runtime, 100, EVICT_EVERY_PUBLISH);
        // Channels that were published to once: their message is evicted at once, and they
        // stay in the table (for its retention time) for every eviction pass to visit.
        runtime.block_on(async {
            for n in 0..others {
                registry
                    .publish(&format!("other-{n}"), None, Payload::Text(PAYLOAD))
                    .await
                    .expect("publish");
            }
        });
        // Stored messages are ordered by the millisecond they were published in: let the last
        // other channel's message be older than the first of `bench`.
        std::thread::sleep(Duration::from_millis(5));
        publish_loop(&runtime, &registry, "bench", 10);
        let kept = registry.history("bench", None, 100).expect("history");
        assert_eq!(kept.messages.len(), 1, "the budget holds one message");
        let id = BenchmarkId::from_parameter(format!("{others} other channels"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| publish_loop(&runtime, &registry, "bench", iters));
        });
    }
    group.finish();
}

criterion_group!(benches, no_subscribers, subscribers, eviction);
criterion_main!(benches);

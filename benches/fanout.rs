//! The registry: fan-out of one publish to 1k, 10k and 100k in-memory connections with 1 and
//! 2 shards (no sockets: this measures the writer tasks pushing into outboxes), and
//! subscribe/unsubscribe churn on a busy channel.
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::Config;
use herald::protocol::Payload;
use herald::registry::{Format, Outbox, Registry};

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

/// Empties every outbox, as writing them to their sockets would.
fn drain(outboxes: &[Arc<Outbox>]) {
    for outbox in outboxes {
        outbox.clear();
    }
}

fn publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("publish");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for subscribers in [1_000, 10_000, 100_000] {
        for shards in [1, 2] {
            let config = Config::default().shards(shards).queue_capacity(64);
            let registry = runtime.block_on(async { Registry::new(&config) });
            let outboxes = subscribe_all(&registry, "bench", subscribers);
            let payload = vec![b'x'; 64];
            group.throughput(Throughput::Elements(subscribers as u64));
            let id = BenchmarkId::new(format!("{shards}-shards"), subscribers);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        let target = registry.metrics().deliveries.get() + subscribers as u64;
                        let start = Instant::now();
                        runtime.block_on(async {
                            registry
                                .publish(
                                    "bench",
                                    None,
                                    Payload::Text(std::str::from_utf8(&payload).unwrap()),
                                )
                                .await
                                .expect("publish");
                            while registry.metrics().deliveries.get() < target {
                                tokio::task::yield_now().await;
                            }
                        });
                        elapsed += start.elapsed();
                        drain(&outboxes);
                    }
                    elapsed
                });
            });
        }
    }
    group.finish();
}

fn churn(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let registry = runtime.block_on(async { Registry::new(&Config::default().shards(2)) });
    let _crowd = subscribe_all(&registry, "busy", 10_000);
    let newcomer = registry.register(Arc::from("newcomer"), Format::Json, None, false);
    c.bench_function("subscribe+unsubscribe (channel of 10k)", |b| {
        b.iter(|| {
            registry.subscribe(newcomer.id, "busy").expect("subscribe");
            assert!(registry.unsubscribe(newcomer.id, "busy"));
        });
    });
    c.bench_function("register+unregister", |b| {
        b.iter(|| {
            let registration = registry.register(Arc::from("x"), Format::Json, None, false);
            registry
                .subscribe(registration.id, "busy")
                .expect("subscribe");
            registry.unregister(registration.id);
        });
    });
}

criterion_group!(benches, publish, churn);
criterion_main!(benches);

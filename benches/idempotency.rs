//! What an `Idempotency-Key` costs a channel publish on the in-memory broker: the publish
//! call without a key, with a new key every time (fingerprint, store lookup and insert; once
//! the store holds `--idempotency-keys` keys, each publish also forgets the oldest), and a
//! retry answered from the store. No subscribers, so the numbers are the publish call itself
//! (the fan-out that follows is the same with or without a key; see `fanout`).
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use herald::Config;
use herald::broker::Broker;
use herald::idempotency::{Fingerprint, Outcome, RequestKey};
use herald::protocol::Payload;
use herald::registry::Registry;

const CONTENT_TYPE: &[u8] = b"application/json";
const BODY: &[u8] = br#"{"title":"your export is ready","url":"/exports/42","n":1}"#;

/// The key as the HTTP API builds it from the request: the header's text and the fingerprint
/// of the content type and body.
fn request_key(key: String) -> RequestKey {
    RequestKey {
        key,
        fingerprint: Fingerprint::of(CONTENT_TYPE, BODY),
    }
}

fn keyed_publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = Config::default().shards(2);
    let broker = runtime.block_on(async { Broker::local(Registry::new(&config), &config) });
    let mut group = c.benchmark_group("idempotency");
    group.measurement_time(Duration::from_secs(5));
    // Each measurement runs its publishes in one block_on, so entering the runtime is not part
    // of the cost.
    group.bench_function("publish without a key", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    broker
                        .publish("bench", None, Payload::Json(BODY))
                        .await
                        .expect("publish");
                }
                start.elapsed()
            })
        });
    });
    let mut next_key = 0u64;
    group.bench_function("publish with a new key", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    next_key += 1;
                    let key = request_key(format!("order-{next_key}"));
                    let outcome = broker
                        .publish_keyed("bench", Payload::Json(BODY), &key)
                        .await
                        .expect("publish");
                    assert!(matches!(outcome, Outcome::First(_)));
                }
                start.elapsed()
            })
        });
    });
    group.bench_function("retry answered from the store", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let key = request_key("order-retried".to_owned());
                    let outcome = broker
                        .publish_keyed("bench", Payload::Json(BODY), &key)
                        .await
                        .expect("publish");
                    assert!(!matches!(outcome, Outcome::Reused));
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, keyed_publish);
criterion_main!(benches);

//! The codec's hot paths: decoding client frames, encoding server frames, masking, and
//! building the JSON envelope a publish is delivered in.
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::protocol::{Payload, message_frame};
use herald::ws::frame::{Decoder, OpCode, encode_frame, encode_masked};
use herald::ws::mask::{apply_mask, apply_mask_fallback};

const SIZES: [usize; 5] = [16, 128, 1024, 16 * 1024, 64 * 1024];

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in SIZES {
        let payload = vec![b'a'; size];
        // 16 frames per buffer, so per-call overhead does not dominate small frames.
        let wire: Vec<u8> = (0..16)
            .flat_map(|_| encode_masked(OpCode::Text, true, &payload, [1, 2, 3, 4]))
            .collect();
        group.throughput(Throughput::Bytes((size * 16) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, wire| {
            let mut decoder = Decoder::new(1 << 20);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                while let Ok(Some(message)) = decoder.decode(&mut buf) {
                    black_box(message);
                }
            });
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in SIZES {
        let payload = vec![b'a'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            b.iter(|| black_box(encode_frame(OpCode::Text, payload)));
        });
    }
    group.finish();
}

fn mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in SIZES {
        let mut data = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("fast", size), |b| {
            b.iter(|| apply_mask(black_box(&mut data), [1, 2, 3, 4]));
        });
        group.bench_function(BenchmarkId::new("bytewise", size), |b| {
            b.iter(|| apply_mask_fallback(black_box(&mut data), [1, 2, 3, 4]));
        });
    }
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for size in [64, 1024, 16 * 1024] {
        let json = format!(r#"{{"text":"{}"}}"#, "x".repeat(size - 11));
        let text = "y".repeat(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("json", size), |b| {
            b.iter(|| {
                black_box(message_frame(
                    "room:lobby",
                    42,
                    Some("alice"),
                    Payload::Json(json.as_bytes()),
                ))
            });
        });
        group.bench_function(BenchmarkId::new("text", size), |b| {
            b.iter(|| black_box(message_frame("room:lobby", 42, None, Payload::Text(&text))));
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, mask, envelope);
criterion_main!(benches);

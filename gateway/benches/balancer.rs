//! Time spent choosing a backend for one request, per strategy and pool size:
//! `cargo bench -p sluice-gateway --bench balancer`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice_gateway::backend_spec::BackendSpec;
use sluice_gateway::balancer::{prefix_hash, Strategy};
use sluice_gateway::config::BackendConfig;
use sluice_gateway::upstream::Upstreams;
use std::hint::black_box;

fn pool(size: u16) -> Upstreams {
    let configs: Vec<BackendConfig> = (0..size)
        .map(|i| {
            let url = format!("http://127.0.0.1:{}", 20_000 + i);
            let spec = BackendSpec::plain(None, url, vec!["m".into()]);
            sluice_gateway::config::backend(&format!("b{i}"), spec).expect("a plain backend")
        })
        .collect();
    Upstreams::new(&configs)
}

fn choose(c: &mut Criterion) {
    let mut group = c.benchmark_group("choose_backend");
    let prefix = prefix_hash(b"You are a helpful assistant. Answer briefly.", 512);
    for size in [3u16, 16] {
        let upstreams = pool(size);
        let route = upstreams.model("m").expect("model m");
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastOutstanding,
            Strategy::P2c,
            Strategy::LoadAware,
            Strategy::PrefixAffinity,
        ] {
            group.bench_with_input(
                BenchmarkId::new(format!("{strategy:?}"), size),
                &size,
                |b, _| b.iter(|| black_box(route.pick(strategy, &[], prefix, 1.25))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, choose);
criterion_main!(benches);

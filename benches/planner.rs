//! Host time of the batched eviction planner alone (`block::WindowPlanner::plan`, no binding): one
//! steady decode forward at batch 1, 64, 256 and 1024, the workload of `bench/planner_step.py`
//! (budget 256, interval 64, block 16; prompts spread over [16, 1500], one new token per request).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use foresightkv::block::{EvictionConfig, Schedule, StepPlan, StepRequest, WindowPlanner};

fn row(key: u64, seq_len: usize, num_new: usize, first: bool) -> StepRequest {
    StepRequest {
        key,
        seq_len,
        num_new,
        prefill: first,
        reset: first,
        prompt_len: None,
    }
}

fn plan(c: &mut Criterion) {
    let ev = EvictionConfig {
        budget: 256,
        interval: 64,
        protect_prompt: false,
    };
    let schedule = Schedule::new(&ev, 16).expect("valid bench schedule");
    let mut g = c.benchmark_group("planner");
    for batch in [1usize, 64, 256, 1024] {
        let prompts: Vec<usize> = (0..batch).map(|i| 16 + (i * 977) % 1485).collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("decode_forward_batch_{batch}"), |b| {
            let mut planner = WindowPlanner::new(schedule, true);
            let mut out = StepPlan::default();
            let first: Vec<StepRequest> = (0..batch)
                .map(|i| row(i as u64, prompts[i], prompts[i], true))
                .collect();
            planner.plan(&first, &mut out).expect("prefill plans");
            let mut step = 0usize;
            b.iter_batched_ref(
                || {
                    step += 1;
                    (0..batch)
                        .map(|i| row(i as u64, prompts[i] + step, 1, false))
                        .collect::<Vec<_>>()
                },
                |rows| {
                    planner
                        .plan(black_box(rows), &mut out)
                        .expect("decode plans");
                    black_box(out.num_tokens)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, plan);
criterion_main!(benches);

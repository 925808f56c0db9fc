//! The per-packet floor for `cargo xtask bench`: a tc program that does nothing. Its
//! BPF_PROG_TEST_RUN time is what any tc program costs before doing work; the benchmark
//! reports the datapath's costs against it. Never attached by the agent.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn bench_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

//! `cargo xtask bench`: the benchmark suite. Not a test: nothing here asserts on timings; it
//! measures, prints a table and writes `target/bench/report.json`.
//!
//! The same binary is also the compiled TCP client and server the connection-latency section
//! runs inside pod namespaces (`dataplane-bench connect-client ...`, `dataplane-bench serve
//! ...`).
#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}

//! How the inspection commands print: a table for people or JSON for tools, one path for all.
use anyhow::Context;
use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum GraphOutput {
    Dot,
    Svg,
    Json,
}

/// SVG through Graphviz's `dot`, when it is installed.
pub fn render_svg(dot: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("SVG needs Graphviz's `dot` (apt-get install graphviz); -o dot and -o json work without it")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dot.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "dot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as `output` asks: JSON, or the table `table` prints.
pub fn emit<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T),
) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(value),
        Output::Table => {
            table(value);
            Ok(())
        }
    }
}

//! `dataplane-agent`: parses the command line and dispatches it (`cli`).
mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.log_format);
    cli::dispatch(cli.command)
}

//! `plinth`: builds Plinth OS images from a TOML image definition.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = builder::cli::Cli::parse();
    match builder::cli::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

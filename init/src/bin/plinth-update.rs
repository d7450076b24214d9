//! `plinth-update`: the update agent. Parses arguments and dispatches to `init::update`.

use std::process::ExitCode;

use init::update::command::{self, Parsed, USAGE};

fn main() -> ExitCode {
    let result = command::parse_args(std::env::args().skip(1)).and_then(|parsed| match parsed {
        Parsed::Help => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Parsed::Run(args) => command::run(*args),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plinth-update: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

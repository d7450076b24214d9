//! Runs files through a fuzz target and shows the panic of each one that makes it panic:
//! `cargo run -p fuzz-targets --example run -- TARGET FILE...`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, files)) = args.split_first() else {
        eprintln!("usage: run TARGET FILE...");
        return ExitCode::from(2);
    };
    let Some(target) = fuzz_targets::by_name(name) else {
        eprintln!("unknown target `{name}`");
        return ExitCode::from(2);
    };
    let mut failed = 0;
    for file in files {
        let data = match std::fs::read(file) {
            Ok(data) => data,
            Err(e) => {
                eprintln!("reading {file}: {e}");
                return ExitCode::from(2);
            }
        };
        eprintln!("--- {file}");
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            failed += 1;
        }
    }
    eprintln!("{failed} of {} inputs panicked", files.len());
    ExitCode::from(u8::from(failed > 0))
}

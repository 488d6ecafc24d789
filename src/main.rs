//! The `ferry` binary: parses the command line and hands off to the library.

use clap::Parser;

fn main() {
    let cli = ferry::cli::Cli::parse();
    let code = match ferry::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

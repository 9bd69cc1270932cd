use clap::Parser;
use sonde::cli::{Cli, Command, RunConfig};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(RunConfig::default())) {
        Command::Check { no_load } => {
            let findings = sonde::probes::check::run(!no_load);
            print!("{}", sonde::probes::check::render(&findings));
            let failed = findings
                .iter()
                .any(|f| f.verdict == sonde::probes::check::Verdict::Fail);
            if failed { 1.into() } else { 0.into() }
        }
        Command::Run(cfg) => match sonde::app::run(cfg) {
            Ok(()) => 0.into(),
            Err(e) => {
                eprintln!("sonde: {e:#}");
                1.into()
            }
        },
    }
}

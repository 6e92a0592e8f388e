//! The `wirescope` binary: parse the command line, set up logging, and hand over.
//! Exit status per CONTRACT.md: 0 clean stop, 2 bad usage or configuration, 1 anything else.

use std::process::ExitCode;

use wirescope::{
    cli::{Cli, Command},
    config::RunConfig,
};

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    match cli.command {
        Command::Run(args) => {
            let cfg = match RunConfig::from_args(&args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("wirescope: {e}");
                    return ExitCode::from(e.exit_code() as u8);
                }
            };
            // Debug and trace are for wirescope's own messages: the netlink and BPF crates
            // beneath would log every request and relocation at those levels.
            env_logger::Builder::new()
                .filter_level(cfg.log_level.min(log::LevelFilter::Info))
                .filter_module("wirescope", cfg.log_level)
                .format_target(false)
                .init();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("wirescope: starting the async runtime failed: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(wirescope::run::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wirescope: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Doctor(args) => wirescope::doctor::run(&args),
        Command::Status(args) => ExitCode::from(wirescope::status_view::run(&args)),
    }
}

//! The `wirescope` binary: parse the command line, set up logging, and hand over.
//! Exit status per docs/CONTRACT.md: 0 clean stop, 2 bad usage or configuration, 1 anything else.

use std::process::ExitCode;

use wirescope::{
    config::cli::{Cli, Command},
    config::{LogFormat, RunConfig},
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
            let mut logger = env_logger::Builder::new();
            logger
                .filter_level(cfg.log_level.min(log::LevelFilter::Info))
                .filter_module("wirescope", cfg.log_level)
                .format_target(false);
            let format = cfg.log_format;
            if format != LogFormat::Text {
                logger.format(move |buf, record| {
                    use std::io::Write as _;
                    let ts = buf.timestamp_millis().to_string();
                    let msg = record.args().to_string();
                    match format.line(&ts, record.level(), &msg) {
                        Some(line) => writeln!(buf, "{line}"),
                        None => writeln!(buf, "{msg}"),
                    }
                });
            }
            logger.init();
            tune_malloc();
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
        Command::Doctor(args) => wirescope::ops::doctor::run(&args),
        Command::Status(args) => ExitCode::from(wirescope::ops::status::run(&args)),
    }
}

/// glibc's malloc, tuned for a long-running agent whose big buffers (a UAPI answer, a
/// /metrics body: megabytes at 10,000 peers) are made and freed every second on whichever
/// thread runs the task. By default glibc raises its mmap threshold after such a buffer is
/// freed, so later ones come from the heap and stay there, and gives each thread its own
/// arena that keeps its own free memory: measured at 10,000 peers, 84 MB resident instead
/// of about 30. A fixed threshold sends every buffer above 128 KiB to mmap (returned on
/// free); one arena shares the freed memory between threads (the agent allocates little
/// concurrently). Set before the runtime starts its threads.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; nothing is allocated concurrently yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

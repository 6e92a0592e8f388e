//! `packaging --binary PATH --out-dir DIR`: the Debian package of an agent binary already
//! built (`cargo xtask package` builds the release binary, then runs this).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use packaging::deb::{self, Compression};

#[derive(Parser)]
#[command(name = "packaging", about = "Build wirescope's Debian package")]
struct Args {
    /// The agent binary to package (target/release/wirescope).
    #[arg(long, value_name = "PATH")]
    binary: PathBuf,
    /// Where the .deb goes (target/debian).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    #[arg(long, value_enum, default_value_t = Compression::Xz)]
    compression: Compression,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match deb::build(&args.binary, &args.out_dir, args.compression) {
        Ok(deb) => {
            println!("{}", deb.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("packaging: {e:#}");
            ExitCode::FAILURE
        }
    }
}

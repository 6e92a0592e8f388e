//! Running the Debian tools (dpkg-deb, dpkg-shlibdeps, md5sum, gzip) with errors that name
//! the command, its status and what it printed. Not xtask's runner: linking xtask here would
//! unify its dependencies' features into this crate's build of the agent, and `cargo xtask
//! package` would then rebuild the release agent on every run.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// `program args...` as one line.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with `input` on its stdin (none: closed) and its output captured; fails when
/// it cannot start (naming the program, probably not installed) or exits non-zero (with
/// its stderr).
pub fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{desc}` (is it installed?)"))?;
    let write = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => stdin.write_all(data),
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{desc}`"))?;
    write.with_context(|| format!("writing the input of `{desc}`"))?;
    if !out.status.success() {
        bail!(
            "`{desc}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_input_and_failures() {
        let out = run(Command::new("cat").arg("-"), Some(b"abc")).expect("cat");
        assert_eq!(out.stdout, b"abc");
        let e = run(Command::new("sh").args(["-c", "echo no >&2; exit 3"]), None)
            .expect_err("exit 3")
            .to_string();
        assert_eq!(e, "`sh -c echo no >&2; exit 3` failed (exit status: 3): no");
        let e = run(&mut Command::new("/nonexistent/tool"), None)
            .expect_err("missing")
            .to_string();
        assert_eq!(e, "starting `/nonexistent/tool` (is it installed?)");
    }
}

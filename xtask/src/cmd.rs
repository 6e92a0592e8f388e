//! Running external programs (ip, wg, wireguard-go, cargo, apt-get) with errors that say
//! which command failed, how, and what it printed.

use std::ffi::OsStr;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// `program args...` as one line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin closed and output captured. Fails when it cannot be
/// started (naming the program, which is then probably not installed) or exits non-zero
/// (with its stderr).
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null());
    let output = cmd.output().with_context(|| start_error(cmd))?;
    check(cmd, output)
}

/// Like [`run`], feeding `input` to the program's stdin.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| start_error(cmd))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let write = stdin.write_all(input);
    drop(stdin);
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    write.with_context(|| format!("writing the input of `{}`", describe(cmd)))?;
    check(cmd, output)
}

/// Runs `program args...` and returns its trimmed stdout.
pub fn stdout<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run(Command::new(program).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `ip args...` in the current (root) network namespace.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

fn start_error(cmd: &Command) -> String {
    format!(
        "could not start `{}`: is `{}` installed? (`cargo xtask setup` installs the lab's tools)",
        describe(cmd),
        cmd.get_program().to_string_lossy()
    )
}

fn check(cmd: &Command, output: Output) -> Result<Output> {
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut detail = stderr.trim().to_owned();
    if detail.is_empty() {
        detail = stdout.trim().to_owned();
    }
    bail!(
        "`{}` failed ({}){}{}",
        describe(cmd),
        output.status,
        if detail.is_empty() { "" } else { ": " },
        detail
    )
}

/// Creates (or empties) an output file, naming it when that fails.
pub fn new_file(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`sh -c echo boom >&2; exit 3` failed"),
            "{msg}"
        );
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn missing_program_says_so() {
        let err = run(&mut Command::new("definitely-not-a-program-xyz")).unwrap_err();
        assert!(format!("{err:#}").contains("is `definitely-not-a-program-xyz` installed?"));
    }

    #[test]
    fn input_is_fed() {
        let out = run_with_input(&mut Command::new("cat"), b"hello").unwrap();
        assert_eq!(out.stdout, b"hello");
    }
}

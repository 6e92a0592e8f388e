//! Running the `wirescope` agent inside a lab namespace, as the demo and the integration
//! tests do: start it, wait until it is healthy, scrape it, stop it with SIGINT.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, ExitStatus, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{
    netns,
    scrape::{Metrics, http_get},
};

/// Names the agent binary the integration tests start instead of the one cargo built them
/// with: the VMs run a copy (see `cargo xtask vm-test`).
pub const AGENT_BIN_ENV: &str = "WIRESCOPE_TEST_AGENT_BIN";

/// Where the agent listens inside its namespace (each namespace has its own loopback).
pub const LISTEN: &str = "127.0.0.1:9586";

pub struct Agent {
    child: Option<Child>,
    ns: String,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Agent {
    /// Starts `bin run --web.listen-address 127.0.0.1:9586 ARGS` in `ns`, logging to `log`,
    /// and waits up to 60 s for `/healthz` to answer 200 (the verifier alone takes about 10 s
    /// under the VMs' software emulation).
    pub fn start(bin: &Path, ns: &str, args: &[&str], log: &Path) -> Result<Agent> {
        Self::start_on(bin, ns, LISTEN, args, log)
    }

    /// [`Agent::start`] listening on `listen` instead of the default.
    pub fn start_on(
        bin: &Path,
        ns: &str,
        listen: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<Agent> {
        let logfile = std::fs::File::create(log)
            .with_context(|| format!("creating the agent log {}", log.display()))?;
        let mut cmd = netns::command(ns, &bin.display().to_string());
        cmd.args(["run", "--web.listen-address", listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {ns}", bin.display()))?;
        let mut agent = Agent {
            child: Some(child),
            ns: ns.to_string(),
            addr: listen
                .parse()
                .with_context(|| format!("listen address {listen}"))?,
            log: log.to_path_buf(),
        };
        agent.wait_healthy(Duration::from_secs(60))?;
        Ok(agent)
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the agent exited with {status} before becoming healthy; its log:\n{}",
                    self.log_text()
                );
            }
            match http_get(&self.ns, self.addr, "/healthz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(Duration::from_millis(100));
        }
        bail!(
            "the agent did not become healthy within {timeout:?} (last answer: {last}); its log:\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.ns, self.addr, path)
    }

    pub fn scrape(&self) -> Result<Metrics> {
        let (code, body) = self.get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        Metrics::parse(&body)
    }

    /// SIGKILL, as a crash would: nothing is cleaned up by the agent.
    pub fn kill(mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGINT, then wait up to 10 s for a clean exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent did not stop within 10 s of SIGINT");
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

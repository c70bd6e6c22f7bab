//! The sandbox's world (`sandbox --world-only`) and `serve` as processes of
//! the binary, each with its log in a file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::command::bridge;

pub const TOKEN: &str = "world-token-123";

/// A log file under the test's target directory, for a child's stderr.
pub fn log_file(name: &str) -> (PathBuf, std::fs::File) {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&path).expect("create a log file");
    (path, file)
}

pub fn terminate(child: &mut Child) -> ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("process {} ignored SIGTERM for 20 s", child.id());
}

/// `approval-bridge sandbox --world-only --print-env json`, running.
pub struct WorldProcess {
    child: Option<Child>,
    /// The printed environment of `serve`.
    pub env: BTreeMap<String, String>,
    /// The sandbox's front door: controls, world view, the bridge behind them.
    pub url: String,
    /// Where `serve` listens (`APPROVAL_BRIDGE_LISTEN`).
    pub bridge_url: String,
    log: PathBuf,
}

impl WorldProcess {
    /// Starts the world and waits for its environment line (bounded).
    pub fn start(args: &[&str]) -> WorldProcess {
        let (log, stderr) = log_file("world");
        let mut child = bridge()
            .args([
                "sandbox",
                "--world-only",
                "--print-env",
                "json",
                "--port",
                "0",
                "--api-token",
                TOKEN,
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start approval-bridge sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = lines.send(line);
        });
        let line = received
            .recv_timeout(Duration::from_secs(240))
            .unwrap_or_default();
        let env: BTreeMap<String, String> = match serde_json::from_str(&line) {
            Ok(env) => env,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no environment line from the sandbox: {line:?}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let url = env["APPROVAL_BRIDGE_SANDBOX_URL"].clone();
        let bridge_url = format!("http://{}/", env["APPROVAL_BRIDGE_LISTEN"]);
        WorldProcess {
            child: Some(child),
            env,
            url,
            bridge_url,
            log,
        }
    }

    /// Starts `serve` with the printed environment on `database_url`, and
    /// waits until it answers `/health` (bounded).
    pub async fn serve(&self, database_url: &str) -> ServeProcess {
        self.serve_with(database_url, &BTreeMap::new()).await
    }

    /// [`WorldProcess::serve`] with some of the printed variables replaced
    /// (another listen address, a proxy in front of a simulator, ...).
    pub async fn serve_with(
        &self,
        database_url: &str,
        overrides: &BTreeMap<String, String>,
    ) -> ServeProcess {
        let mut env = self.env.clone();
        env.extend(overrides.clone());
        let bridge_url = format!("http://{}/", env["APPROVAL_BRIDGE_LISTEN"]);
        let (log, stderr) = log_file("serve");
        let child = bridge()
            .arg("serve")
            .envs(&env)
            .env("DATABASE_URL", database_url)
            .stdout(stderr.try_clone().expect("clone a file handle"))
            .stderr(stderr)
            .spawn()
            .expect("start approval-bridge serve");
        let mut serve = ServeProcess { child, log };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = http.get(format!("{bridge_url}health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return serve;
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("serve exited with {status}: {}", serve.log());
            }
            if Instant::now() > deadline {
                panic!("serve did not answer within 60 s: {}", serve.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, as Ctrl-C would: the sandbox stops everything it started.
    pub fn stop(mut self) -> ExitStatus {
        terminate(self.child.as_mut().expect("running"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorldProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && child.try_wait().ok().flatten().is_none()
        {
            terminate(child);
        }
    }
}

/// A running `approval-bridge serve`; dropping it kills it.
pub struct ServeProcess {
    child: Child,
    log: PathBuf,
}

impl ServeProcess {
    /// SIGKILL: no shutdown, no clean-up, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process stops where it is, holding its connections and
    /// leases, as a long pause (a VM frozen, a swap storm) would.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`ServeProcess::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} {}", self.child.id());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

//! A real `keepfs nbd` in a child process, on a port the kernel chose.
#![allow(dead_code)]

use super::Repo;
use std::io::{BufRead, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A `keepfs nbd` child on a port the kernel chose; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Collects what the server writes to stderr after its first line.
    log: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    pub fn start(repo: &Repo, args: &[&str]) -> Server {
        Server::start_with_env(repo, args, &[])
    }

    /// [`Server::start`] with these environment variables set for the server.
    pub fn start_with_env(repo: &Repo, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut all = vec!["nbd"];
        all.extend_from_slice(args);
        if !args.contains(&"--socket") {
            all.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        }
        let mut command = repo.command(&all);
        command.envs(env.iter().copied());
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // The first line says where it listens; the rest goes to the log.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("keepfs: serving NBD on ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let log = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            rest
        });
        Server { child, addr, log: Some(log) }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }
}

impl Server {
    /// Stops the server as an operator would (SIGTERM), waits for it, and returns its
    /// exit status and what it logged.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let mut status = None;
        super::mount::wait_until("the NBD server to stop on SIGTERM", LIMIT, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        let log = self.log.take().map(|t| t.join().unwrap()).unwrap_or_default();
        (status.expect("exited"), log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

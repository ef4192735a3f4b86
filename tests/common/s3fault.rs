//! A fault-injecting HTTP proxy in front of the real S3 server: it forwards requests to
//! Garage untouched, except the ones a test has planned a fault for. A real server cannot
//! be made to answer 503 SlowDown or 429, to receive a damaged body, or to stall on demand;
//! this is the one place the S3 tests use something other than the real part, and the
//! part behind it is still the real server.
//!
//! One request per client connection: the proxy asks the server for `Connection: close`
//! and closes the client's connection after the answer (HTTP/1.1 clients reconnect).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to one request instead of (or while) forwarding it.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status and S3 error code, without asking the server.
    Status(u16, &'static str),
    /// Flip one byte of the request body, then forward it (the server must refuse it:
    /// the body no longer matches its Content-MD5).
    CorruptBody,
    /// Hold the request this long without answering, then close the connection.
    Stall(Duration),
    /// Close the connection without answering.
    Reset,
}

struct Plan {
    /// Faults for the next requests whose method matches, in order; at most one per
    /// object, so that a planned fault is always followed by a good attempt of the same
    /// request, whatever the interleaving of the client's threads.
    next: VecDeque<(&'static str, Fault)>,
    /// Paths (without the query) that have had their planned fault.
    faulted: std::collections::HashSet<String>,
    /// A fault for every matching request while set (a lasting outage).
    always: Option<(&'static str, Fault)>,
    /// Faults applied so far, with the method and path of their request.
    applied: Vec<(String, String, Fault)>,
    /// Requests forwarded to the server: method and path.
    forwarded: Vec<(String, String)>,
}

pub struct FaultProxy {
    pub port: u16,
    plan: Arc<Mutex<Plan>>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to the server on `upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan {
            next: VecDeque::new(),
            faulted: Default::default(),
            always: None,
            applied: Vec::new(),
            forwarded: Vec::new(),
        }));
        let p = plan.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let p = p.clone();
                std::thread::spawn(move || serve(conn, upstream, &p));
            }
        });
        FaultProxy { port, plan }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Plans `fault` for the next request with this method ("PUT", "GET", ... or "*").
    pub fn then(&self, method: &'static str, fault: Fault) {
        self.plan.lock().unwrap().next.push_back((method, fault));
    }

    /// Applies `fault` to every request with this method until [`FaultProxy::heal`].
    pub fn always(&self, method: &'static str, fault: Fault) {
        self.plan.lock().unwrap().always = Some((method, fault));
    }

    /// Forgets every planned fault.
    pub fn heal(&self) {
        let mut p = self.plan.lock().unwrap();
        p.next.clear();
        p.always = None;
    }

    /// The planned faults not yet applied.
    pub fn pending(&self) -> usize {
        self.plan.lock().unwrap().next.len()
    }

    /// The faults applied so far: (method, path, fault).
    pub fn applied(&self) -> Vec<(String, String, Fault)> {
        self.plan.lock().unwrap().applied.clone()
    }

    /// The distinct paths of forwarded requests with this method containing `part`.
    pub fn forwarded_paths(&self, method: &str, part: &str) -> std::collections::BTreeSet<String> {
        let p = self.plan.lock().unwrap();
        p.forwarded.iter().filter(|(m, p)| m == method && p.contains(part)).map(|(_, p)| p.clone()).collect()
    }

    /// How many requests with this method and a path containing `part` reached the server.
    pub fn forwarded(&self, method: &str, part: &str) -> usize {
        self.plan.lock().unwrap().forwarded.iter().filter(|(m, p)| m == method && p.contains(part)).count()
    }
}

fn matches(planned: &str, method: &str) -> bool {
    planned == "*" || planned == method
}

/// Reads one request: its head (up to the blank line) and a Content-Length body.
fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn serve(mut conn: TcpStream, upstream: u16, plan: &Mutex<Plan>) {
    let Some((head, mut body)) = read_request(&mut conn) else { return };
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let fault = {
        let mut p = plan.lock().unwrap();
        let object = path.split('?').next().unwrap_or("").to_string();
        let planned = match p.next.front() {
            Some((m, _)) if matches(m, &method) && !p.faulted.contains(&object) => {
                p.faulted.insert(object);
                p.next.pop_front().map(|(_, f)| f)
            }
            _ => p.always.as_ref().filter(|(m, _)| matches(m, &method)).map(|(_, f)| f.clone()),
        };
        if let Some(f) = &planned {
            p.applied.push((method.clone(), path.clone(), f.clone()));
        }
        if !matches!(planned, Some(Fault::Status(..)) | Some(Fault::Stall(_)) | Some(Fault::Reset)) {
            p.forwarded.push((method.clone(), path.clone()));
        }
        planned
    };
    match fault {
        Some(Fault::Status(status, code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message><Resource>{path}</Resource></Error>"
            );
            let answer = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            );
            let _ = conn.write_all(answer.as_bytes());
            return;
        }
        Some(Fault::Stall(d)) => {
            std::thread::sleep(d);
            return;
        }
        Some(Fault::Reset) => return,
        Some(Fault::CorruptBody) => {
            let middle = body.len() / 2;
            if let Some(b) = body.get_mut(middle) {
                *b ^= 0x20;
            }
        }
        None => {}
    }
    // Forward with `Connection: close`, so that the server's answer ends with EOF.
    let mut forwarded = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    if up.write_all(forwarded.as_bytes()).is_err() || up.write_all(&body).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = up.read_to_end(&mut answer);
    let _ = conn.write_all(&answer);
}

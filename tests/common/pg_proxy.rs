//! A TCP proxy in front of Postgres that breaks a connection as a network
//! does: after it forwarded a COMMIT (the server commits, its answer never
//! comes back), before a COMMIT reaches the server, or when the connection
//! asks to LISTEN. It reads the frontend's messages to find them; everything
//! else passes through untouched.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgFault {
    /// The next COMMIT is forwarded; once the server has answered it, the
    /// connection is closed without passing the answer on. Once.
    CommitAnswerLost,
    /// The next COMMIT is not forwarded; the connection is closed. Once.
    CommitLost,
    /// Every connection that sends LISTEN is closed instead.
    ListenBroken,
}

pub struct PgProxy {
    /// The database's URL, through the proxy.
    pub url: String,
    fault: Arc<Mutex<Option<PgFault>>>,
    tripped: Arc<AtomicUsize>,
}

impl PgProxy {
    pub async fn start(database_url: &str) -> PgProxy {
        let parsed = reqwest::Url::parse(database_url).expect("a database URL");
        let upstream = format!(
            "{}:{}",
            parsed.host_str().expect("a host"),
            parsed.port().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut url = parsed.clone();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        let proxy = PgProxy {
            url: url.to_string(),
            fault: Arc::default(),
            tripped: Arc::default(),
        };
        let (fault, tripped) = (proxy.fault.clone(), proxy.tripped.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, fault.clone(), tripped.clone()));
            }
        });
        proxy
    }

    pub fn arm(&self, fault: PgFault) {
        *self.fault.lock().unwrap() = Some(fault);
    }

    /// How many connections a fault broke.
    pub fn tripped(&self) -> usize {
        self.tripped.load(Ordering::SeqCst)
    }
}

/// What the proxy does with one frontend message.
enum Verdict {
    Forward,
    /// Forward it, then close once the server answered.
    ForwardThenDrop,
    Drop,
}

fn verdict(fault: &Mutex<Option<PgFault>>, kind: u8, body: &[u8]) -> Verdict {
    // A simple query is its text; a Parse is a statement name, then its text.
    let text = match kind {
        b'Q' => body,
        b'P' => body.splitn(2, |b| *b == 0).nth(1).unwrap_or_default(),
        _ => return Verdict::Forward,
    };
    let text = String::from_utf8_lossy(text).trim().to_ascii_uppercase();
    let mut fault = fault.lock().unwrap();
    match *fault {
        Some(PgFault::ListenBroken) if text.starts_with("LISTEN") => Verdict::Drop,
        Some(PgFault::CommitAnswerLost) if text.starts_with("COMMIT") => {
            *fault = None;
            Verdict::ForwardThenDrop
        }
        Some(PgFault::CommitLost) if text.starts_with("COMMIT") => {
            *fault = None;
            Verdict::Drop
        }
        _ => Verdict::Forward,
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: Arc<Mutex<Option<PgFault>>>,
    tripped: Arc<AtomicUsize>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once the fatal COMMIT is on its way: the server's next bytes are its answer.
    let swallow = Arc::new(AtomicBool::new(false));
    let upstream = {
        let swallow = swallow.clone();
        let tripped = tripped.clone();
        async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            // Until the StartupMessage, messages have no type byte.
            let mut started = false;
            loop {
                let n = client_read.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
                loop {
                    let header = if started { 5 } else { 4 };
                    if buffer.len() < header {
                        break;
                    }
                    let at = header - 4;
                    let len = u32::from_be_bytes(buffer[at..at + 4].try_into().unwrap()) as usize;
                    let total = at + len;
                    if buffer.len() < total {
                        break;
                    }
                    let message: Vec<u8> = buffer.drain(..total).collect();
                    let verdict = if started {
                        verdict(&fault, message[0], &message[5..])
                    } else {
                        // 196608 is protocol 3.0: the StartupMessage.
                        started = message[4..8] == 196_608u32.to_be_bytes();
                        Verdict::Forward
                    };
                    match verdict {
                        Verdict::Forward => {}
                        Verdict::ForwardThenDrop => {
                            swallow.store(true, Ordering::SeqCst);
                            tripped.fetch_add(1, Ordering::SeqCst);
                        }
                        Verdict::Drop => {
                            tripped.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    if server_write.write_all(&message).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let downstream = async move {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = server_read.read(&mut chunk).await.unwrap_or(0);
            if n == 0 || swallow.load(Ordering::SeqCst) {
                return;
            }
            if client_write.write_all(&chunk[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first closes both connections.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

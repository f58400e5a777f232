//! The fault proxy: a loopback TCP proxy to a broker that a test can cut, stall, make
//! swallow an answer, and restore.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{BrokerServer, PATIENCE};

/// A loopback TCP proxy to a broker server.
pub struct Proxy {
    pub port: u16,
    /// The server's URL through the proxy.
    url: String,
    /// Both ends of every open connection, to shut them down.
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Whether new connections are refused.
    pub down: Arc<AtomicBool>,
    /// Whether nothing is passed on any more, in either direction, while every connection
    /// stays open (a stopped server, or a network that drops packets).
    stalled: Arc<AtomicBool>,
    /// What a client sends that makes the proxy swallow the answers to it, once (see
    /// [`Proxy::swallow_answer_to`]).
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
    /// Set once an answer was swallowed.
    pub swallowed: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(server: &impl BrokerServer) -> Proxy {
        let upstream = server.port();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Proxy {
            port,
            url: server.url_on(port),
            open: Arc::default(),
            down: Arc::default(),
            stalled: Arc::default(),
            trigger: Arc::default(),
            swallowed: Arc::default(),
        };
        let (open, down) = (Arc::clone(&proxy.open), Arc::clone(&proxy.down));
        let (stalled, trigger, swallowed) = (
            Arc::clone(&proxy.stalled),
            Arc::clone(&proxy.trigger),
            Arc::clone(&proxy.swallowed),
        );
        // Threads, one per direction of each connection: a test proxy carries a handful.
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if down.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                // Whether this connection's answers are swallowed from now on.
                let mute = Arc::new(AtomicBool::new(false));
                for (from, to, answers) in [(&client, &server, false), (&server, &client, true)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let pass = Pass {
                        stalled: Arc::clone(&stalled),
                        mute: Arc::clone(&mute),
                        trigger: Arc::clone(&trigger),
                        swallowed: Arc::clone(&swallowed),
                        answers,
                    };
                    thread::spawn(move || pass.run(from, to));
                }
                open.lock().unwrap().extend([client, server]);
            }
        });
        proxy
    }

    /// The server's URL through the proxy.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Passes nothing on any more, keeping every connection open and accepting new ones.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Shuts every connection down and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Swallows every answer on the first connection whose client sends `request` (a chunk
    /// holding it), from that request on: the server runs the request, but its client never
    /// hears back. Everything else is passed through.
    pub fn swallow_answer_to(&self, request: &[u8]) {
        *self.trigger.lock().unwrap() = Some(request.to_vec());
    }

    /// The connections open through the proxy, once there are at least `at_least` (the
    /// proxy registers a connection just after it started carrying it).
    pub fn connections(&self, at_least: usize) -> usize {
        let end = Instant::now() + PATIENCE;
        loop {
            let open = self.open.lock().unwrap().len() / 2;
            if open >= at_least || Instant::now() >= end {
                return open;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One direction of one connection through the proxy.
struct Pass {
    stalled: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
    swallowed: Arc<AtomicBool>,
    /// Whether this direction carries the server's answers.
    answers: bool,
}

impl Pass {
    fn run(self, mut from: TcpStream, mut to: TcpStream) {
        let mut buffer = vec![0; 1 << 16];
        while let Ok(read @ 1..) = from.read(&mut buffer) {
            let chunk = &buffer[..read];
            // A stalled proxy holds what it read, forever.
            while self.stalled.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(10));
            }
            if self.answers {
                if self.mute.load(Ordering::SeqCst) {
                    continue;
                }
            } else if self.triggers(chunk) && !self.swallowed.swap(true, Ordering::SeqCst) {
                // Muted before the request goes on, so that no part of its answer slips
                // through.
                self.mute.store(true, Ordering::SeqCst);
            }
            if to.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    }

    fn triggers(&self, chunk: &[u8]) -> bool {
        match &*self.trigger.lock().unwrap() {
            Some(request) => chunk.windows(request.len()).any(|w| w == &request[..]),
            None => false,
        }
    }
}

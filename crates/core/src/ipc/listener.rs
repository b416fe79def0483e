//! [`Listener`] and [`Client`]: [`Connection`]s between unrelated processes that find each
//! other by name (Python's `multiprocessing.connection.Listener` and `Client`), over the
//! `interprocess` crate's local sockets.
//!
//! A name with a `/` in it is a filesystem path (the socket file's permissions limit who can
//! reach it, and it is removed when the listener is dropped); any other name lives in Linux's
//! abstract socket namespace, which every process of the same network namespace can reach. So a
//! connection is only handed over after both ends proved they hold the same secret key:
//!
//! 1. listener → client: a greeting naming the protocol, and a 32-byte random challenge;
//! 2. client → listener: its own 32-byte challenge, and HMAC-SHA256(key, "client" ‖ both
//!    challenges);
//! 3. listener → client: refused, or accepted with HMAC-SHA256(key, "server" ‖ both
//!    challenges).
//!
//! The key never travels, each proof is bound to fresh challenges from both sides (a recorded
//! handshake cannot be replayed), and the role labels keep one side's proof from being reflected
//! back as the other's. A peer that stalls is cut off when the handshake deadline passes.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{
    GenericFilePath, GenericNamespaced, ListenerNonblockingMode, ListenerOptions, Name, Stream,
};
use sha2::Sha256;

use crate::error::{Error, ErrorKind, Result};
use crate::ipc::pipe::Connection;
use crate::ipc::wait::{Waitable, Watch};
use crate::sys::{self, POLLIN, PollFd};
use crate::transport::channel::Channel;

/// How long either side waits for the other to finish the handshake, unless the listener sets
/// its own ([`Listener::handshake_timeout`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol's greeting, versioned so that a stranger fails clearly.
const GREETING: &[u8; 8] = b"MPAUTH1\0";
const CHALLENGE: usize = 32;
const PROOF: usize = 32;
const REFUSED: u8 = 0;
const ACCEPTED: u8 = 1;

/// Waits for [`Client`]s that know the key, by name.
pub struct Listener {
    socket: interprocess::local_socket::Listener,
    name: String,
    key: Vec<u8>,
    handshake_timeout: Duration,
    /// Clients connected and greeted whose answer has not arrived yet: every `accept` serves
    /// all of them at once, so that no number of silent or slow clients delays one that holds
    /// the key beyond its own handshake.
    pending: Mutex<Vec<Pending>>,
}

/// The most handshakes in progress at once; past it, the oldest is dropped for the newest (a
/// flood of silent connections then costs its own members their handshake, nobody else).
const MAX_PENDING: usize = 4096;

/// A client greeted with our challenge, and what it has answered so far.
struct Pending {
    stream: UnixStream,
    ours: [u8; CHALLENGE],
    reply: Vec<u8>,
    deadline: Instant,
}

/// Connects to a [`Listener`] by name (Python's `multiprocessing.connection.Client`).
#[derive(Debug)]
pub struct Client;

impl Listener {
    /// Listens at `name` (a path if it contains `/`, an abstract-namespace name otherwise),
    /// accepting only clients that hold `key`.
    ///
    /// Fails if the name is taken, or the key is empty (it would authenticate anyone).
    pub fn bind(name: &str, key: &[u8]) -> Result<Listener> {
        check_key(key)?;
        // Accept never blocks (the wait is a poll with the caller's deadline, and another
        // thread may take the client between the poll and the accept); accepted streams do.
        let socket = ListenerOptions::new()
            .name(socket_name(name)?)
            .nonblocking(ListenerNonblockingMode::Accept)
            .create_sync()
            .map_err(|e| Error::io(format!("listening at `{name}`"), e))?;
        Ok(Listener {
            socket,
            name: name.to_owned(),
            key: key.to_owned(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Sets how long a connecting client may take to authenticate (default
    /// [`HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The name it listens at.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the next client that completes the handshake, and returns it.
    ///
    /// Handshakes proceed side by side: every client that connects is greeted at once, and
    /// the first to prove the key is returned, however many silent or slow ones connected
    /// before it (each of those is cut off when its own handshake timeout passes; at most
    /// 4,096 are kept waiting, the oldest dropped first). A client without the key gets
    /// [`ErrorKind::AuthenticationFailed`] here (and on its side); one that stalls,
    /// [`ErrorKind::Timeout`] when its time is up. Either way the listener is still good: call
    /// `accept` again for the next client.
    pub fn accept<T>(&self) -> Result<Connection<T>> {
        self.accept_until(None)
    }

    /// [`accept`](Self::accept), failing with [`ErrorKind::Timeout`] if no client connects
    /// within `timeout`.
    pub fn accept_timeout<T>(&self, timeout: Duration) -> Result<Connection<T>> {
        self.accept_until(Some(Instant::now() + timeout))
    }

    fn accept_until<T>(&self, deadline: Option<Instant>) -> Result<Connection<T>> {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            self.greet_new_clients(&mut pending)?;
            // A handshake that finished (either way) or ran out of time is this call's answer.
            let now = Instant::now();
            for index in 0..pending.len() {
                let outcome = match step(&mut pending[index], &self.key) {
                    Step::Waiting if pending[index].deadline <= now => {
                        Err(Error::new(ErrorKind::Timeout, "the handshake did not finish in time"))
                    }
                    Step::Waiting => continue,
                    Step::Done(outcome) => outcome,
                };
                let Pending { stream, .. } = pending.swap_remove(index);
                return outcome.and_then(|()| connection(stream));
            }
            let soonest = pending.iter().map(|p| p.deadline).min();
            let wake = match (deadline, soonest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut set = Vec::with_capacity(pending.len() + 1);
            set.push(PollFd::new(self.socket_fd(), POLLIN));
            set.extend(pending.iter().map(|p| PollFd::new(p.stream.as_fd(), POLLIN)));
            sys::poll(&mut set, wake).map_err(|e| Error::io("poll a listener", e))?;
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) && !ready(&set) {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no client connected to `{}` in time", self.name),
                ));
            }
        }
    }

    /// Accepts every client waiting at the socket and sends each its greeting and challenge.
    fn greet_new_clients(&self, pending: &mut Vec<Pending>) -> Result<()> {
        loop {
            let stream = match self.socket.accept() {
                Ok(stream) => into_unix(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io(format!("accept at `{}`", self.name), e)),
            };
            let ours = challenge()?;
            let mut hello = GREETING.to_vec();
            hello.extend_from_slice(&ours);
            // A new socket's buffer takes the 40-byte greeting whole; one that does not is
            // dropped like any failed handshake.
            if stream.set_nonblocking(true).is_err() || (&stream).write_all(&hello).is_err() {
                continue;
            }
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
            }
            let deadline = Instant::now() + self.handshake_timeout;
            pending.push(Pending { stream, ours, reply: Vec::new(), deadline });
        }
    }
}

/// What one pending handshake has come to.
enum Step {
    Waiting,
    Done(Result<()>),
}

/// Reads what a pending client has sent; once its whole answer is in, checks the proof and
/// answers with ours (or the refusal).
fn step(pending: &mut Pending, key: &[u8]) -> Step {
    let mut buf = [0u8; CHALLENGE + PROOF];
    let want = CHALLENGE + PROOF - pending.reply.len();
    match (&pending.stream).read(&mut buf[..want]) {
        Ok(0) => {
            let hung_up = "the other side hung up during the handshake";
            return Step::Done(Err(Error::new(ErrorKind::Protocol, hung_up)));
        }
        Ok(n) => pending.reply.extend_from_slice(&buf[..n]),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
        Err(e) => return Step::Done(Err(handshake_error(e))),
    }
    if pending.reply.len() < CHALLENGE + PROOF {
        return Step::Waiting;
    }
    let (theirs, proof) = pending.reply.split_at(CHALLENGE);
    let stream = &pending.stream;
    // The answers are small enough for the socket's buffer: written whole or not at all.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if mac(key, b"client", &pending.ours, theirs).verify_slice(proof).is_err() {
        // Best effort: the client learns why; the refusal stands either way.
        let _ = (&pending.stream).write_all(&[REFUSED]);
        return Step::Done(Err(Error::new(
            ErrorKind::AuthenticationFailed,
            "a client that does not hold the key was refused",
        )));
    }
    let mut answer = vec![ACCEPTED];
    answer.extend_from_slice(&mac(key, b"server", &pending.ours, theirs).finalize().into_bytes());
    Step::Done((&pending.stream).write_all(&answer).map_err(handshake_error))
}

/// Whether `poll` found anything ready.
fn ready(set: &[PollFd<'_>]) -> bool {
    set.iter().any(|entry| entry.revents() != 0)
}

impl Client {
    /// Connects to the listener at `name` and authenticates with `key`, waiting at most
    /// [`HANDSHAKE_TIMEOUT`] for the listener's side of the handshake.
    pub fn connect<T>(name: &str, key: &[u8]) -> Result<Connection<T>> {
        Self::connect_timeout(name, key, HANDSHAKE_TIMEOUT)
    }

    /// [`connect`](Self::connect) with a deadline of `timeout` for the handshake.
    pub fn connect_timeout<T>(name: &str, key: &[u8], timeout: Duration) -> Result<Connection<T>> {
        check_key(key)?;
        let stream = Stream::connect(socket_name(name)?)
            .map_err(|e| Error::io(format!("connecting to `{name}`"), e))?;
        let mut stream = into_unix(stream);
        prove_client(&mut stream, key, Instant::now() + timeout)?;
        connection(stream)
    }
}

/// The client's side: answer the listener's challenge, then check its proof.
fn prove_client(stream: &mut UnixStream, key: &[u8], deadline: Instant) -> Result<()> {
    let mut hello = [0; GREETING.len() + CHALLENGE];
    read_until(stream, &mut hello, deadline)?;
    let (greeting, theirs) = hello.split_at(GREETING.len());
    if greeting != GREETING {
        return Err(Error::new(
            ErrorKind::Protocol,
            "the listener does not speak multiproc's handshake",
        ));
    }
    let ours = challenge()?;
    let mut reply = ours.to_vec();
    reply.extend_from_slice(&mac(key, b"client", theirs, &ours).finalize().into_bytes());
    write_until(stream, &reply, deadline)?;
    let mut verdict = [0; 1];
    read_until(stream, &mut verdict, deadline)?;
    if verdict[0] != ACCEPTED {
        return Err(Error::new(ErrorKind::AuthenticationFailed, "the listener refused our key"));
    }
    let mut proof = [0; PROOF];
    read_until(stream, &mut proof, deadline)?;
    mac(key, b"server", theirs, &ours).verify_slice(&proof).map_err(|_| {
        Error::new(ErrorKind::AuthenticationFailed, "the listener does not hold the key")
    })
}

/// HMAC-SHA256 keyed with `key` over the role label and both challenges (the listener's
/// first).
fn mac(key: &[u8], role: &[u8], listener: &[u8], client: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(role);
    mac.update(listener);
    mac.update(client);
    mac
}

fn challenge() -> Result<[u8; CHALLENGE]> {
    let mut bytes = [0; CHALLENGE];
    sys::random_bytes(&mut bytes).map_err(|e| Error::io("getrandom for a challenge", e))?;
    Ok(bytes)
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::new(ErrorKind::InvalidState, "an empty key would authenticate anyone"));
    }
    Ok(())
}

fn socket_name(name: &str) -> Result<Name<'_>> {
    let named = if name.contains('/') {
        name.to_fs_name::<GenericFilePath>()
    } else {
        name.to_ns_name::<GenericNamespaced>()
    };
    named.map_err(|e| Error::io(format!("socket name `{name}`"), e))
}

fn into_unix(stream: Stream) -> UnixStream {
    match stream {
        Stream::UdSocket(stream) => UnixStream::from(OwnedFd::from(stream)),
    }
}

/// The authenticated stream as a connection: its timeouts cleared, as a connection has its own.
fn connection<T>(stream: UnixStream) -> Result<Connection<T>> {
    let clear = |s: &UnixStream| s.set_read_timeout(None).and_then(|()| s.set_write_timeout(None));
    clear(&stream).map_err(|e| Error::io("clearing handshake timeouts", e))?;
    Ok(Connection::new(Channel::new(stream)))
}

/// Fills `buf` from `stream`, failing once `deadline` passes.
fn read_until(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.set_read_timeout(Some(left(deadline)?)).map_err(handshake_error)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "the other side hung up during the handshake",
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(handshake_error(e)),
        }
    }
    Ok(())
}

/// Writes all of `data` to `stream`, failing once `deadline` passes.
fn write_until(stream: &mut UnixStream, data: &[u8], deadline: Instant) -> Result<()> {
    stream.set_write_timeout(Some(left(deadline)?)).map_err(handshake_error)?;
    stream.write_all(data).map_err(handshake_error)
}

/// Time left before `deadline`, or a timeout error once none is.
fn left(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::new(ErrorKind::Timeout, "the handshake did not finish in time"));
    }
    Ok(left)
}

fn handshake_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::new(ErrorKind::Timeout, "the handshake did not finish in time")
        }
        _ => Error::io("handshake", e),
    }
}

impl Listener {
    /// The listening socket: readable when a client is waiting.
    fn socket_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            interprocess::local_socket::Listener::UdSocket(listener) => listener.as_fd(),
        }
    }
}

impl Waitable for Listener {
    /// Ready when a client is waiting to be accepted.
    fn watch(&self) -> Watch<'_> {
        Watch::fd(self.socket_fd())
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").field("name", &self.name).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn unique_name(what: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("multiproc-test-{what}-{}-{n}", std::process::id())
    }

    #[test]
    fn a_client_with_the_key_gets_a_working_connection() {
        let name = unique_name("good");
        let listener = Listener::bind(&name, b"secret").unwrap();
        let client = thread::spawn(move || {
            let mut conn = Client::connect::<String>(&name, b"secret").unwrap();
            conn.send(&"hello".to_owned()).unwrap();
            conn.recv().unwrap()
        });
        let mut conn = listener.accept_timeout::<String>(Duration::from_secs(30)).unwrap();
        let hello = conn.recv().unwrap();
        conn.send(&format!("{hello} back")).unwrap();
        assert_eq!(client.join().unwrap(), "hello back");
    }

    #[test]
    fn a_client_without_the_key_is_refused_and_the_listener_goes_on() {
        let name = unique_name("wrong");
        let listener = Listener::bind(&name, b"secret").unwrap();
        let intruder = {
            let name = name.clone();
            thread::spawn(move || Client::connect::<u8>(&name, b"guess").unwrap_err().kind())
        };
        let refused = listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::AuthenticationFailed);
        assert_eq!(intruder.join().unwrap(), ErrorKind::AuthenticationFailed);
        let friend = thread::spawn(move || Client::connect::<u8>(&name, b"secret").map(drop));
        listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap();
        friend.join().unwrap().unwrap();
    }

    #[test]
    fn a_listener_without_the_key_is_not_trusted() {
        // An impostor at the name that says "accepted" to anyone: the client checks its proof
        // and refuses to go on.
        let name = unique_name("impostor");
        let impostor =
            ListenerOptions::new().name(socket_name(&name).unwrap()).create_sync().unwrap();
        let client = thread::spawn(move || Client::connect::<u8>(&name, b"secret").unwrap_err());
        let mut stream = into_unix(impostor.accept().unwrap());
        let mut hello = GREETING.to_vec();
        hello.extend_from_slice(&[1; CHALLENGE]);
        stream.write_all(&hello).unwrap();
        stream.read_exact(&mut [0; CHALLENGE + PROOF]).unwrap();
        let mut answer = vec![ACCEPTED];
        answer.extend_from_slice(&[2; PROOF]);
        stream.write_all(&answer).unwrap();
        let refused = client.join().unwrap();
        assert_eq!(refused.kind(), ErrorKind::AuthenticationFailed);
        assert!(refused.to_string().contains("does not hold the key"), "{refused}");
    }

    #[test]
    fn a_silent_or_garbled_peer_does_not_hold_the_listener() {
        let name = unique_name("silent");
        let listener =
            Listener::bind(&name, b"secret").unwrap().handshake_timeout(Duration::from_millis(50));
        let silent = Stream::connect(socket_name(&name).unwrap()).unwrap();
        let stalled = listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap_err();
        assert_eq!(stalled.kind(), ErrorKind::Timeout);
        drop(silent);
        let mut garbled = into_unix(Stream::connect(socket_name(&name).unwrap()).unwrap());
        garbled.write_all(&[7; CHALLENGE + PROOF]).unwrap();
        let refused = listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::AuthenticationFailed);
        let nobody = listener.accept_timeout::<u8>(Duration::from_millis(1)).unwrap_err();
        assert_eq!(nobody.kind(), ErrorKind::Timeout);
    }

    #[test]
    fn a_thousand_silent_connections_do_not_delay_a_client_with_the_key() {
        let name = unique_name("flood");
        // Each silent client would hold an inline handshake for its whole timeout.
        let listener =
            Listener::bind(&name, b"secret").unwrap().handshake_timeout(Duration::from_secs(60));
        let silent: Vec<_> =
            (0..1000).map(|_| Stream::connect(socket_name(&name).unwrap()).unwrap()).collect();
        let friend = {
            let name = name.clone();
            thread::spawn(move || Client::connect::<u8>(&name, b"secret").map(drop))
        };
        // Inline handshakes would take 1000 × 60 s here.
        listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap();
        friend.join().unwrap().unwrap();
        assert_eq!(listener.pending.lock().unwrap().len(), 1000);
        drop(silent);
    }

    #[test]
    fn two_threads_accepting_one_client_do_not_hang() {
        let name = unique_name("race");
        let listener = Listener::bind(&name, b"k").unwrap();
        let client = thread::spawn(move || Client::connect::<u8>(&name, b"k").map(drop));
        let outcomes: Vec<Option<ErrorKind>> = thread::scope(|scope| {
            let accept = || listener.accept_timeout::<u8>(Duration::from_millis(500)).err();
            let first = scope.spawn(accept);
            let second = scope.spawn(accept);
            vec![first.join().unwrap().map(|e| e.kind()), second.join().unwrap().map(|e| e.kind())]
        });
        client.join().unwrap().unwrap();
        // One thread got the client; the other gave up at its deadline instead of blocking.
        assert!(outcomes.contains(&None), "{outcomes:?}");
        assert!(outcomes.contains(&Some(ErrorKind::Timeout)), "{outcomes:?}");
    }

    #[test]
    fn path_names_work_and_are_removed_with_the_listener() {
        let path = std::env::temp_dir().join(unique_name("path"));
        let name = path.to_str().unwrap().to_owned();
        let listener = Listener::bind(&name, b"k").unwrap();
        assert!(path.exists());
        let client = thread::spawn(move || Client::connect::<u8>(&name, b"k").map(drop));
        listener.accept_timeout::<u8>(Duration::from_secs(30)).unwrap();
        client.join().unwrap().unwrap();
        drop(listener);
        assert!(!path.exists());
        assert!(Listener::bind("empty-key", b"").is_err());
    }
}

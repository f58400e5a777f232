//! The source's own connection to the server: a socket with a read buffer that frames
//! replies without parsing them, so that the hot paths read entries and confirmations
//! straight from the received bytes instead of through a generic `redis::Value` tree.
//!
//! The `redis` crate's reply parser builds a `Value` for every string of a reply: an
//! `XREADGROUP` reply of 256 entries is about 1,800 allocations, and the parser alone took a
//! third of the service's CPU time end to end. Here a reply is first framed (its length
//! found by walking its headers, without copying anything); the hot paths then read it in
//! place:
//! - [`Wire::read_group`] turns an `XREADGROUP` reply into entries, allocating only the
//!   vector of entries (and the attributes of foreign entries that carry some);
//! - [`Wire::pipeline_ok`] checks the replies of a pipeline of `XADD`s without keeping any.
//!
//! Every other command goes through the [`redis::ConnectionLike`] implementation, which
//! hands each framed reply to the crate's own parser: scripts, `XGROUP`, `INFO` and the like
//! behave exactly as with the crate's connection. The connection speaks RESP2 (replies of
//! RESP3 types are framed, and parsed by the crate's parser, all the same).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, ConnectionLike, ErrorKind, RedisError, Value};

use super::reply::{self, Entry, EntryId, Fields};

/// Size of the read buffer at first; it doubles while a reply does not fit.
const BUFFER: usize = 64 * 1024;
/// Longest reply read: twice Redis's own longest bulk string (`proto-max-bulk-len`). A
/// longer one is not a reply this source asked for.
const MAX_REPLY: usize = 1 << 30;

/// The socket.
enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket (`redis+unix://` and `unix://` addresses).
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_read_timeout(timeout),
            #[cfg(unix)]
            Stream::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_write_timeout(timeout),
            #[cfg(unix)]
            Stream::Unix(stream) => stream.set_write_timeout(timeout),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(buf),
            #[cfg(unix)]
            Stream::Unix(stream) => stream.read(buf),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.write_all(bytes),
            #[cfg(unix)]
            Stream::Unix(stream) => stream.write_all(bytes),
        }
    }
}

/// A connection to the server.
pub(super) struct Wire {
    /// The socket.
    stream: Stream,
    /// Received bytes; `buf[start..end]` is not consumed yet.
    buf: Vec<u8>,
    /// Start of the unconsumed bytes.
    start: usize,
    /// End of the received bytes.
    end: usize,
    /// False once a read or write failed or a reply was not the Redis protocol: the stream's
    /// position is unknown, and the connection must not be used again.
    open: bool,
    /// The database selected at connection.
    db: i64,
    /// The server's id of this connection (`CLIENT ID`), once asked.
    id: Option<i64>,
}

/// A parse error: the reply is not the Redis protocol.
fn not_redis(bytes: &[u8]) -> RedisError {
    let shown: String = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
    RedisError::from((
        ErrorKind::Parse,
        "invalid reply",
        format!("the reply starts with {shown:?}"),
    ))
}

impl Wire {
    /// Connects to the server of `info` (`timeout` bounds the connection and the handshake),
    /// authenticates and selects the database.
    pub(super) fn open(info: &ConnectionInfo, timeout: Duration) -> Result<Wire, RedisError> {
        let stream = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let mut last = None;
                let mut connected = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            connected = Some(stream);
                            break;
                        }
                        Err(error) => last = Some(error),
                    }
                }
                let stream = match (connected, last) {
                    (Some(stream), _) => stream,
                    (None, Some(error)) => return Err(error.into()),
                    (None, None) => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no address found for {host}"),
                        )
                        .into())
                    }
                };
                // Every request is written whole and waits for its reply: small writes must
                // not wait for an earlier segment's acknowledgement.
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            _ => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "this build connects over tcp and unix sockets only (no tls)",
                )))
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let settings = info.redis_settings();
        let mut wire = Wire {
            stream,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
            open: true,
            db: settings.db(),
            id: None,
        };
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password).exec(&mut wire)?;
        }
        if settings.db() != 0 {
            redis::cmd("SELECT").arg(settings.db()).exec(&mut wire)?;
        }
        Ok(wire)
    }

    /// The server's id of this connection (`CLIENT ID`, asked once): what `CLIENT UNBLOCK`
    /// names to end a blocking read.
    pub(super) fn client_id(&mut self) -> Result<i64, RedisError> {
        if let Some(id) = self.id {
            return Ok(id);
        }
        let id: i64 = redis::cmd("CLIENT").arg("ID").query(self)?;
        self.id = Some(id);
        Ok(id)
    }

    /// Sets the read timeout of every later command.
    pub(super) fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), RedisError> {
        Ok(self.stream.set_read_timeout(timeout)?)
    }

    /// Sets the write timeout of every later command.
    pub(super) fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), RedisError> {
        Ok(self.stream.set_write_timeout(timeout)?)
    }

    /// Sends `packed` (one or more commands).
    fn send(&mut self, packed: &[u8]) -> Result<(), RedisError> {
        if !self.open {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "connection closed").into());
        }
        self.stream.write_all(packed).map_err(|error| {
            self.open = false;
            RedisError::from(error)
        })
    }

    /// Reads the next reply; returns where it lies in `buf`.
    fn frame(&mut self) -> Result<(usize, usize), RedisError> {
        loop {
            match frame_len(&self.buf[self.start..self.end]) {
                Ok(Some(len)) => {
                    let at = self.start;
                    self.start += len;
                    return Ok((at, at + len));
                }
                Ok(None) => self.fill()?,
                Err(()) => {
                    self.open = false;
                    return Err(not_redis(&self.buf[self.start..self.end]));
                }
            }
        }
    }

    /// Reads more bytes: makes room first, by moving the unconsumed bytes to the front or,
    /// when they fill most of the buffer, by doubling it (so that a long reply is framed a
    /// logarithmic number of times).
    fn fill(&mut self) -> Result<(), RedisError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let unconsumed = self.end - self.start;
        if unconsumed * 2 > self.buf.len() {
            if self.buf.len() >= MAX_REPLY {
                self.open = false;
                return Err(RedisError::from((
                    ErrorKind::Parse,
                    "invalid reply",
                    format!("a reply longer than {MAX_REPLY} bytes"),
                )));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        if self.buf.len() - self.end < self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = unconsumed;
        }
        match self.stream.read(&mut self.buf[self.end..]) {
            Ok(0) => {
                self.open = false;
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )
                .into())
            }
            Ok(read) => {
                self.end += read;
                Ok(())
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(error) => {
                self.open = false;
                Err(error.into())
            }
        }
    }

    /// The next reply, parsed by the crate's parser.
    fn value(&mut self) -> Result<Value, RedisError> {
        let (from, to) = self.frame()?;
        redis::parse_redis_value(&self.buf[from..to])
    }

    /// Sends a pipeline of `count` commands whose replies are only checked: the first error
    /// reply is returned (after every reply was read, so the connection stays usable).
    pub(super) fn pipeline_ok(&mut self, packed: &[u8], count: usize) -> Result<(), RedisError> {
        self.send(packed)?;
        let mut first_error = None;
        for _ in 0..count {
            let (from, to) = self.frame()?;
            if matches!(self.buf[from], b'-' | b'!') && first_error.is_none() {
                first_error = Some(redis::parse_redis_value(&self.buf[from..to])?.extract_error());
            }
        }
        match first_error {
            Some(Err(error)) => Err(error),
            _ => Ok(()),
        }
    }

    /// Sends an `XREADGROUP` of one stream and reads its entries (none when it timed out).
    pub(super) fn read_group(&mut self, packed: &[u8]) -> Result<Vec<Entry>, RedisError> {
        self.send(packed)?;
        let (from, to) = self.frame()?;
        let bytes = &self.buf[from..to];
        if let Some(entries) = read_entries(bytes) {
            return Ok(entries);
        }
        // An error, or a shape the fast path does not know (a RESP3 map): the crate's
        // parser reads it.
        let value = redis::parse_redis_value(bytes)?.extract_error()?;
        Ok(reply::read_reply_entries(value))
    }
}

impl ConnectionLike for Wire {
    fn req_packed_command(&mut self, cmd: &[u8]) -> Result<Value, RedisError> {
        self.send(cmd)?;
        self.value()
    }

    /// Reads `offset + count` replies and returns the last `count`. Only plain pipelines are
    /// sent on this connection (no `MULTI`): an error reply is returned as a value, and
    /// `Pipeline::query` reports it.
    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> Result<Vec<Value>, RedisError> {
        self.send(cmd)?;
        let mut values = Vec::with_capacity(count);
        for index in 0..offset + count {
            let value = self.value()?;
            if index >= offset {
                values.push(value);
            }
        }
        Ok(values)
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").exec(self).is_ok()
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

/// The length of the first complete reply of `bytes`; `Ok(None)` when more bytes are
/// needed, `Err` when they are not the Redis protocol. Walks the headers iteratively (a
/// count of values still expected), so a deeply nested reply cannot exhaust the stack.
fn frame_len(bytes: &[u8]) -> Result<Option<usize>, ()> {
    let mut pos = 0;
    let mut expected: u64 = 1;
    while expected > 0 {
        expected -= 1;
        let Some(&kind) = bytes.get(pos) else {
            return Ok(None);
        };
        let Some(newline) = bytes[pos..].iter().position(|&b| b == b'\n') else {
            // A header line is short: a long one without its end is not the protocol.
            return if bytes.len() - pos > 64 * 1024 {
                Err(())
            } else {
                Ok(None)
            };
        };
        let line_end = pos + newline;
        if newline < 2 || bytes[line_end - 1] != b'\r' {
            return Err(());
        }
        let line = &bytes[pos + 1..line_end - 1];
        pos = line_end + 1;
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            b'$' | b'!' | b'=' => {
                let len = signed(line)?;
                if len >= 0 {
                    let len = usize::try_from(len).map_err(|_| ())?;
                    let end = pos.checked_add(len).and_then(|end| end.checked_add(2));
                    let Some(end) = end else { return Err(()) };
                    if end > bytes.len() {
                        return Ok(None);
                    }
                    if &bytes[end - 2..end] != b"\r\n" {
                        return Err(());
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' => {
                let len = signed(line)?;
                if len > 0 {
                    expected = expected.checked_add(len as u64).ok_or(())?;
                }
            }
            b'%' | b'|' => {
                let len = signed(line)?;
                if len > 0 {
                    let more = (len as u64).checked_mul(2).ok_or(())?;
                    expected = expected.checked_add(more).ok_or(())?;
                }
                if kind == b'|' {
                    // Attributes precede the value they describe.
                    expected += 1;
                }
            }
            _ => return Err(()),
        }
    }
    Ok(Some(pos))
}

/// A header's decimal number (an optional `-`, then 1 to 18 digits).
fn signed(line: &[u8]) -> Result<i64, ()> {
    let (negative, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(());
    }
    let mut n: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return Err(());
        }
        n = n * 10 + i64::from(digit - b'0');
    }
    Ok(if negative { -n } else { n })
}

/// A reader of one framed reply.
struct Cursor<'a> {
    /// The reply.
    bytes: &'a [u8],
    /// Where the next value starts.
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The number of a header of type `kind` (`*` array, `$` bulk string).
    fn header(&mut self, kind: u8) -> Option<i64> {
        if *self.bytes.get(self.pos)? != kind {
            return None;
        }
        let newline = self.bytes[self.pos..].iter().position(|&b| b == b'\n')?;
        let line = self.bytes.get(self.pos + 1..self.pos + newline - 1)?;
        self.pos += newline + 1;
        signed(line).ok()
    }

    /// An array's length; `None` for anything else (a nil array included).
    fn array(&mut self) -> Option<usize> {
        usize::try_from(self.header(b'*')?).ok()
    }

    /// A bulk string's bytes.
    fn bulk(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.header(b'$')?).ok()?;
        let text = self.bytes.get(self.pos..self.pos + len)?;
        self.pos += len + 2;
        Some(text)
    }
}

/// The entries of a RESP2 `XREADGROUP` reply read in place, or `None` when the reply has
/// another shape (an error, a RESP3 map): the caller then parses it generically. A nil
/// reply (the block timed out) has no entries.
fn read_entries(bytes: &[u8]) -> Option<Vec<Entry>> {
    if bytes.starts_with(b"*-1\r\n") || bytes.starts_with(b"_\r\n") {
        return Some(Vec::new());
    }
    let mut cursor = Cursor { bytes, pos: 0 };
    let mut entries = Vec::new();
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
    for _ in 0..cursor.array()? {
        if cursor.array()? != 2 {
            return None;
        }
        cursor.bulk()?;
        let rows = cursor.array()?;
        entries.reserve(rows);
        for _ in 0..rows {
            if cursor.array()? != 2 {
                return None;
            }
            let id = EntryId::parse(std::str::from_utf8(cursor.bulk()?).ok()?)?;
            let len = cursor.array()?;
            pairs.clear();
            for _ in 0..len / 2 {
                pairs.push((cursor.bulk()?, cursor.bulk()?));
            }
            if len % 2 == 1 {
                cursor.bulk()?;
            }
            entries.push((id, Fields::from_pairs(id, pairs.iter().copied()), 1));
        }
    }
    Some(entries)
}

/// Appends a command's header (`*argc`) to `buf`.
pub(super) fn command(buf: &mut Vec<u8>, argc: usize) {
    buf.push(b'*');
    push_number(buf, argc as u64);
    buf.extend_from_slice(b"\r\n");
}

/// Appends one argument to `buf`.
pub(super) fn arg(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.push(b'$');
    push_number(buf, bytes.len() as u64);
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(bytes);
    buf.extend_from_slice(b"\r\n");
}

/// Appends an entry id as one argument to `buf`.
pub(super) fn arg_id(buf: &mut Vec<u8>, id: EntryId) {
    let mut text = [0u8; 41];
    let mut len = 0;
    for (part, sep) in [(id.ms, Some(b'-')), (id.seq, None)] {
        let mut digits = [0u8; 20];
        let mut n = part;
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &digit in digits[..count].iter().rev() {
            text[len] = digit;
            len += 1;
        }
        if let Some(sep) = sep {
            text[len] = sep;
            len += 1;
        }
    }
    arg(buf, &text[..len]);
}

/// Appends `n` in decimal.
fn push_number(buf: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut n = n;
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend(digits[..count].iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_whole_or_not_at_all() {
        let reply = b"*2\r\n$3\r\nfoo\r\n*1\r\n:5\r\n+OK\r\n";
        assert_eq!(frame_len(reply), Ok(Some(reply.len() - 5)));
        for cut in 0..reply.len() - 5 {
            assert_eq!(frame_len(&reply[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"*-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"%1\r\n+a\r\n:1\r\n"), Ok(Some(12)));
        assert_eq!(frame_len(b"HTTP/1.1 400 Bad Request\r\n"), Err(()));
        assert_eq!(frame_len(b"$3\r\nfoobar\r\n"), Err(()));
        assert_eq!(frame_len(b"*x\r\n"), Err(()));
        assert_eq!(frame_len(b"*\r\n"), Err(()));
        assert_eq!(signed(b"-1"), Ok(-1));
        assert_eq!(signed(b"1234567"), Ok(1_234_567));
        assert_eq!(signed(b"1x"), Err(()));
    }

    #[test]
    fn entries_are_read_in_place() {
        let id = "5a0c0f54-8a3e-4bde-9f1c-2b1f3a4d5e6f";
        let reply = format!(
            "*1\r\n*2\r\n$6\r\nmayhem\r\n*2\r\n\
             *2\r\n$3\r\n1-0\r\n*4\r\n$10\r\nmessage_id\r\n$36\r\n{id}\r\n$4\r\ndata\r\n$11\r\ncattle-ab12\r\n\
             *2\r\n$3\r\n2-7\r\n*8\r\n$8\r\nattempts\r\n$1\r\n3\r\n$6\r\norigin\r\n$4\r\nbill\r\n$10\r\nmessage_id\r\n$1\r\nx\r\n$4\r\ndata\r\n$0\r\n\r\n"
        );
        assert_eq!(frame_len(reply.as_bytes()), Ok(Some(reply.len())));
        let entries = read_entries(reply.as_bytes()).expect("a known shape");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0.to_string(), "1-0");
        let message = entries[0].1.message.as_ref().expect("a message");
        assert_eq!(message.instance_name(), Ok("cattle-ab12"));
        assert_eq!(message.id().to_string(), id);
        assert_eq!(message.attributes().len(), 0);
        assert_eq!(entries[1].0.to_string(), "2-7");
        let message = entries[1].1.message.as_ref().expect("a message");
        assert_eq!(message.id().to_string(), "x");
        assert_eq!(message.attributes().get("origin"), Some("bill"));
        assert_eq!(entries[1].1.attempts, 3);
        assert_eq!(read_entries(b"*-1\r\n").map(|e| e.len()), Some(0));
        assert!(read_entries(b"-NOGROUP no group\r\n").is_none());
    }

    /// A connection to a loopback "server" that answers each request with the next of
    /// `replies`, written in small pieces so that replies arrive split.
    fn scripted(replies: Vec<Vec<u8>>) -> (Wire, std::thread::JoinHandle<()>) {
        use redis::IntoConnectionInfo;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 4096];
            for reply in replies {
                let _ = stream.read(&mut request).expect("request");
                for piece in reply.chunks(1000) {
                    stream.write_all(piece).expect("reply");
                }
            }
        });
        let info = format!("redis://127.0.0.1:{port}/0")
            .into_connection_info()
            .expect("url");
        let wire = Wire::open(&info, Duration::from_secs(5)).expect("connect");
        (wire, server)
    }

    #[test]
    fn long_and_split_replies_are_read_whole() {
        let long = "x".repeat(300_000);
        let entries =
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n4-2\r\n*2\r\n$8\r\nattempts\r\n$1\r\n2\r\n"
                .to_vec();
        let (mut wire, server) = scripted(vec![
            format!("${}\r\n{long}\r\n", long.len()).into_bytes(),
            entries,
            b"+OK\r\n+OK\r\n-ERR no\r\n".to_vec(),
            b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
        ]);
        let value = wire
            .req_packed_command(b"*1\r\n$4\r\nPING\r\n")
            .expect("a reply");
        assert_eq!(value, Value::BulkString(long.into_bytes()));
        let read = wire.read_group(b"*1\r\n$4\r\nPING\r\n").expect("entries");
        assert_eq!(read.len(), 1);
        assert_eq!(
            (read[0].0.to_string(), read[0].1.attempts),
            ("4-2".to_owned(), 2)
        );
        let failed = wire.pipeline_ok(b"*1\r\n$4\r\nPING\r\n", 3);
        assert_eq!(
            failed.map_err(|error| error.code().map(str::to_owned)),
            Err(Some("ERR".to_owned()))
        );
        assert!(
            wire.is_open(),
            "an error reply leaves the connection usable"
        );
        let garbage = wire.req_packed_command(b"*1\r\n$4\r\nPING\r\n");
        assert!(matches!(garbage, Err(error) if error.kind() == ErrorKind::Parse));
        assert!(
            !wire.is_open(),
            "a reply that is not the protocol closes the connection"
        );
        server.join().expect("server");
    }

    #[test]
    fn commands_are_encoded_as_the_crate_does() {
        let mut buf = Vec::new();
        command(&mut buf, 3);
        arg(&mut buf, b"XACK");
        arg(&mut buf, b"s");
        arg_id(
            &mut buf,
            EntryId {
                ms: 1_700_000_000_000,
                seq: 0,
            },
        );
        let expected = redis::cmd("XACK")
            .arg("s")
            .arg("1700000000000-0")
            .get_packed_command();
        assert_eq!(buf, expected);
    }
}

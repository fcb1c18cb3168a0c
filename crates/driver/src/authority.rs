//! Lets every gRPC client in over the Unix socket, whatever it sends as `:authority`.
//!
//! A CSI driver is reached over a Unix socket, so the HTTP/2 `:authority` of a request means
//! nothing to it. Clients fill it differently: grpc-go sends `localhost` (or, in older
//! releases, the raw socket path), grpc-java the raw path, and gRPC C-core (Python, C++,
//! Ruby) since 1.57 the percent-encoded path, e.g. `%2Frun%2Fcsi%2Fcsi.sock`. The HTTP/2 server
//! under tonic parses `:authority` as a URI authority and resets the stream with
//! PROTOCOL_ERROR when that fails (`/` and `%` are refused), so such clients could not call
//! anything.
//!
//! [`AuthorityFix`] wraps each accepted connection and reads the client's byte stream the
//! way the server will: the connection preface, then HTTP/2 frames. Every frame passes
//! through untouched except header blocks (HEADERS and its CONTINUATION frames), which are
//! HPACK-decoded with a decoder that follows the client's encoder (dynamic table and its size
//! updates). As long as no block has needed a change, the original bytes are forwarded, so
//! the server's HPACK table stays the client's. From the first block whose `:authority` does
//! not parse as a URI authority on, this block and every later one on the connection are
//! re-encoded as literals without indexing (plus static-table references), with
//! `:authority: localhost` in place of the unparsable value. The server's dynamic table is
//! then never referenced again, so it cannot go out of step with the client's.
//!
//! Malformed input is not judged here: the bytes are passed on unchanged and the server
//! answers with its own protocol error. The one exception is a header block that cannot be
//! decoded (or is over [`MAX_BLOCK`]) after rewriting began: passing it on would let the server
//! decode it against a table that no longer matches, so the connection is closed instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header: 24-bit length, type, flags, 31-bit stream id.
const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames this adapter writes are never longer than the smallest SETTINGS_MAX_FRAME_SIZE a
/// peer may set (RFC 9113 §4.2), so whatever the server's setting, they fit.
const MAX_EMITTED_PAYLOAD: usize = 16_384;
/// The largest header block (all its frames, as sent) held while it is gathered.
pub const MAX_BLOCK: usize = 1 << 20;
/// The largest decoded header list (RFC 7541 §4.1 size: name + value + 32 for each field).
const MAX_DECODED: usize = 1 << 20;
/// The server's HPACK table size (SETTINGS_HEADER_TABLE_SIZE): the HTTP/2 default, which the
/// server does not change. A client's size update above it is an error for both.
const TABLE_SIZE_LIMIT: usize = 4096;
/// What replaces an `:authority` the server would refuse.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// How much is read from the socket at a time while header blocks are inspected.
const READ_CHUNK: usize = 16 * 1024;

/// Whether the HTTP/2 server accepts this `:authority` value.
fn authority_ok(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// An accepted connection whose client→server HTTP/2 stream is read through a [`Rewriter`].
/// Writes go straight to the socket.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Bytes ready for the server, from `pending[taken..]`.
    pending: Vec<u8>,
    taken: usize,
    /// What is read from the socket before it goes through the rewriter.
    scratch: Vec<u8>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            pending: Vec::new(),
            taken: 0,
            scratch: Vec::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.taken);
                buf.put_slice(&this.pending[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.pending.len() {
                    this.pending.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.passing_through() {
                // Nothing held back and nothing more to inspect: read straight into the
                // caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.scratch.len() != READ_CHUNK {
                this.scratch.resize(READ_CHUNK, 0);
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let got = chunk.filled();
            if got.is_empty() {
                // End of stream: whatever was held back goes on as it came, then the end.
                this.rewriter.end(&mut this.pending);
                if this.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.rewriter.feed(got, &mut this.pending)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every header block so far was forwarded as it came.
    Clean,
    /// A block needed a change: every block from then on is re-encoded without indexing.
    Rewriting,
    /// Nothing is inspected any more (the client broke the protocol, or the stream is not
    /// HTTP/2): bytes go through as they are and the server judges them.
    Passthrough,
}

/// Where the reader is inside the frame sequence.
enum Frame {
    /// Gathering the next 9-byte frame header into `head[..head_len]`.
    Head,
    /// Forwarding `left` more payload bytes of a frame that is not part of a header block.
    Copy { left: usize },
    /// Gathering the payload of a HEADERS or CONTINUATION frame.
    Gather {
        head: [u8; FRAME_HEAD],
        payload: Vec<u8>,
        len: usize,
    },
}

/// A header block being gathered.
struct Block {
    stream: u32,
    end_stream: bool,
    /// Its frames exactly as they came.
    raw: Vec<u8>,
    /// The HPACK bytes of its frames, padding and priority fields removed.
    fragment: Vec<u8>,
}

/// The client→server byte stream of one connection, frame by frame, without I/O: bytes in
/// through [`Rewriter::feed`], bytes for the server out.
pub struct Rewriter {
    mode: Mode,
    /// How many bytes of the preface have been seen.
    preface_seen: usize,
    head: [u8; FRAME_HEAD],
    head_len: usize,
    frame: Frame,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    /// The fields of the last decoded block.
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE_LIMIT);
        Rewriter {
            mode: Mode::Clean,
            preface_seen: 0,
            head: [0; FRAME_HEAD],
            head_len: 0,
            frame: Frame::Head,
            block: None,
            decoder,
            fields: Vec::new(),
        }
    }

    /// Whether bytes now go through uninspected.
    pub fn passing_through(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Whether header blocks are being re-encoded.
    pub fn rewriting(&self) -> bool {
        self.mode == Mode::Rewriting
    }

    /// Takes the next bytes from the client and appends what the server is to read to
    /// `out`. A header block is held back until its last frame is in. An error means the
    /// connection must be closed.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        while !input.is_empty() {
            if self.mode == Mode::Passthrough {
                out.extend_from_slice(input);
                return Ok(());
            }
            if self.preface_seen < PREFACE.len() {
                let expected = &PREFACE[self.preface_seen..];
                let n = expected.len().min(input.len());
                if input[..n] != expected[..n] {
                    // Not HTTP/2 with prior knowledge: the server says what it thinks of it.
                    self.mode = Mode::Passthrough;
                    continue;
                }
                out.extend_from_slice(&input[..n]);
                self.preface_seen += n;
                input = &input[n..];
                continue;
            }
            match &mut self.frame {
                Frame::Head => {
                    let n = (FRAME_HEAD - self.head_len).min(input.len());
                    self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
                    self.head_len += n;
                    input = &input[n..];
                    if self.head_len == FRAME_HEAD {
                        self.head_len = 0;
                        self.start_frame(out)?;
                    }
                }
                Frame::Copy { left } => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.frame = Frame::Head;
                    }
                }
                Frame::Gather { payload, len, .. } => {
                    let n = (*len - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if payload.len() == *len {
                        self.end_gathered_frame(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The client closed its side: what is held back goes on as it came.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        let holding =
            self.block.is_some() || self.head_len > 0 || matches!(self.frame, Frame::Gather { .. });
        if holding {
            self.release_held(out);
        }
    }

    /// Appends every byte held back, in the order it came, and stops inspecting.
    fn release_held(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        match std::mem::replace(&mut self.frame, Frame::Head) {
            Frame::Gather { head, payload, .. } => {
                out.extend_from_slice(&head);
                out.extend_from_slice(&payload);
            }
            Frame::Head => out.extend_from_slice(&self.head[..self.head_len]),
            Frame::Copy { .. } => {}
        }
        self.head_len = 0;
        self.mode = Mode::Passthrough;
    }

    /// A frame header is complete in `self.head`.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let head = self.head;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let kind = head[3];
        let stream = stream_id(&head);
        let held = match &self.block {
            Some(block) if kind != CONTINUATION || block.stream != stream => {
                // Another frame inside a header block: a connection error the server reports.
                self.head_len = FRAME_HEAD;
                self.release_held(out);
                return Ok(());
            }
            Some(block) => block.raw.len(),
            None if kind == CONTINUATION => {
                // A CONTINUATION outside a header block: likewise.
                self.head_len = FRAME_HEAD;
                self.release_held(out);
                return Ok(());
            }
            None => 0,
        };
        if kind != HEADERS && kind != CONTINUATION {
            out.extend_from_slice(&head);
            if len > 0 {
                self.frame = Frame::Copy { left: len };
            }
            return Ok(());
        }
        if held + FRAME_HEAD + len > MAX_BLOCK {
            self.head_len = FRAME_HEAD;
            return self.undecodable(out, "a header block over 1 MiB");
        }
        self.frame = Frame::Gather {
            head,
            payload: Vec::with_capacity(len),
            len,
        };
        if len == 0 {
            self.end_gathered_frame(out)?;
        }
        Ok(())
    }

    /// The payload of a HEADERS or CONTINUATION frame is complete.
    fn end_gathered_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let Frame::Gather { head, payload, .. } = &self.frame else {
            return Ok(());
        };
        let (kind, flags) = (head[3], head[4]);
        let fragment = if kind == HEADERS {
            header_fragment(flags, payload)
        } else {
            Some(&payload[..])
        };
        let Some(fragment) = fragment else {
            // Padding longer than the frame: a protocol error the server reports.
            self.release_held(out);
            return Ok(());
        };
        let block = self.block.get_or_insert_with(|| Block {
            stream: stream_id(head),
            end_stream: flags & END_STREAM != 0,
            raw: Vec::new(),
            fragment: Vec::new(),
        });
        block.raw.extend_from_slice(head);
        block.raw.extend_from_slice(payload);
        block.fragment.extend_from_slice(fragment);
        self.frame = Frame::Head;
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.end_block(block, out)?;
            }
        }
        Ok(())
    }

    /// A complete header block: forward it, or re-encode it.
    fn end_block(&mut self, block: Block, out: &mut Vec<u8>) -> io::Result<()> {
        if let Err(why) = self.decode(&block.fragment) {
            self.block = Some(block);
            return self.undecodable(out, why);
        }
        let refused = self
            .fields
            .iter()
            .find(|(name, value)| name == b":authority" && !authority_ok(value));
        if self.mode == Mode::Clean {
            let Some((_, authority)) = refused else {
                out.extend_from_slice(&block.raw);
                return Ok(());
            };
            tracing::debug!(
                authority = %String::from_utf8_lossy(authority),
                "the client's :authority is no URI authority; its header blocks are re-encoded from now on"
            );
            self.mode = Mode::Rewriting;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &self.fields {
            let value = if name == b":authority" && !authority_ok(value) {
                REPLACEMENT_AUTHORITY
            } else {
                value
            };
            encode_field(name, value, &mut encoded);
        }
        emit_block(block.stream, block.end_stream, &encoded, out);
        Ok(())
    }

    /// A header block that cannot be decoded, or is too large. Before any rewrite the server
    /// decodes the same bytes with the same table and answers for itself; after one, its
    /// table no longer matches the client's, so the connection is closed.
    fn undecodable(&mut self, out: &mut Vec<u8>, why: &str) -> io::Result<()> {
        if self.mode == Mode::Rewriting {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("closing an HTTP/2 connection whose header blocks are re-encoded: {why}"),
            ));
        }
        self.release_held(out);
        Ok(())
    }

    /// Decodes a header block fragment into `self.fields`, keeping the table in step.
    fn decode(&mut self, mut fragment: &[u8]) -> Result<(), &'static str> {
        self.fields.clear();
        // Dynamic table size updates at the start of the block (RFC 7541 §4.2) are applied
        // here, so a block that holds nothing else is accepted as the server accepts it.
        while let Some(&first) = fragment.first() {
            if first & 0xe0 != 0x20 {
                break;
            }
            let (size, used) = decode_integer(fragment, 5).ok_or("a malformed integer")?;
            if size > TABLE_SIZE_LIMIT {
                return Err("a table size update over the server's limit");
            }
            self.decoder.set_max_table_size(size);
            fragment = &fragment[used..];
        }
        // The decoder builds a Huffman table for every Huffman-coded string it meets, which
        // made this adapter half of the server's CPU time; strings are decoded here with a
        // table-driven decoder instead, and the decoder is given them as plain literals.
        let plain = without_huffman(fragment)?;
        let mut total = 0usize;
        let fields = &mut self.fields;
        self.decoder
            .decode_with_cb(&plain, |name, value| {
                total = total.saturating_add(name.len() + value.len() + 32);
                if total <= MAX_DECODED {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|_| "an HPACK decoding error")?;
        if total > MAX_DECODED {
            return Err("a header list over 1 MiB");
        }
        Ok(())
    }
}

/// The same header block with every Huffman-coded string literal replaced by its plain
/// form (RFC 7541 §5.2). The representations, their order and the decoded strings do not
/// change, so a decoder's dynamic table evolves exactly as with the original block.
fn without_huffman(mut block: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(block.len() + block.len() / 2);
    // Copies the integer of a representation as it is, and says its value.
    let integer = |block: &mut &[u8], prefix: u8, out: &mut Vec<u8>| {
        let (value, used) = decode_integer(block, prefix).ok_or("a malformed integer")?;
        out.extend_from_slice(&block[..used]);
        *block = &block[used..];
        Ok::<usize, &'static str>(value)
    };
    let string = |block: &mut &[u8], out: &mut Vec<u8>| {
        let huffman = block.first().ok_or("a cut string")? & 0x80 != 0;
        let (len, used) = decode_integer(block, 7).ok_or("a malformed string length")?;
        let raw = block
            .get(used..used.checked_add(len).ok_or("a string length overflow")?)
            .ok_or("a cut string")?;
        if huffman {
            let mut plain = Vec::with_capacity(len + len / 2);
            httlib_huffman::decode(raw, &mut plain, httlib_huffman::DecoderSpeed::FiveBits)
                .map_err(|_| "a malformed Huffman string")?;
            encode_string(&plain, out);
        } else {
            out.extend_from_slice(&block[..used + len]);
        }
        *block = &block[used + len..];
        Ok::<(), &'static str>(())
    };
    while let Some(&first) = block.first() {
        if first & 0x80 != 0 {
            // Indexed field: an index only.
            integer(&mut block, 7, &mut out)?;
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            integer(&mut block, 5, &mut out)?;
        } else {
            // A literal: with incremental indexing (6-bit index), or without / never
            // indexed (4-bit index); a zero index means the name is a string too.
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            if integer(&mut block, prefix, &mut out)? == 0 {
                string(&mut block, &mut out)?;
            }
            string(&mut block, &mut out)?;
        }
    }
    Ok(out)
}

fn stream_id(head: &[u8; FRAME_HEAD]) -> u32 {
    u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff
}

/// The HPACK bytes of a HEADERS frame's payload, without padding and priority fields; `None`
/// when the padding does not fit.
fn header_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

/// Writes a header block as a HEADERS frame and as many CONTINUATION frames as it needs.
fn emit_block(stream: u32, end_stream: bool, encoded: &[u8], out: &mut Vec<u8>) {
    let mut at = 0;
    let mut first = true;
    loop {
        let n = (encoded.len() - at).min(MAX_EMITTED_PAYLOAD);
        let last = at + n == encoded.len();
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first && end_stream {
            flags |= END_STREAM;
        }
        // n <= 16384 fits the 24-bit length.
        out.extend_from_slice(&(n as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(&encoded[at..at + n]);
        at += n;
        first = false;
        if last {
            return;
        }
    }
}

/// HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1): the value and the bytes used.
fn decode_integer(buf: &[u8], prefix: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(*buf.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0u32;
    for (i, &byte) in buf.iter().enumerate().skip(1) {
        let part = usize::from(byte & 0x7f);
        if shift > 28 {
            return None;
        }
        value = value.checked_add(part << shift)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
        shift += 7;
    }
    None
}

/// Writes an HPACK integer (RFC 7541 §5.1); `high` holds the bits above the prefix.
fn encode_integer(value: usize, prefix: u8, high: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal without Huffman coding (RFC 7541 §5.2).
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// One field, never touching the dynamic table: an indexed static entry when name and value
/// are one, else a literal without indexing (RFC 7541 §6.2.2), its name indexed when it is in
/// the static table.
fn encode_field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let mut name_index = None;
    for (i, (n, v)) in STATIC_TABLE.iter().enumerate() {
        if *n == name {
            if *v == value {
                encode_integer(i + 1, 7, 0x80, out);
                return;
            }
            name_index.get_or_insert(i + 1);
        }
    }
    match name_index {
        Some(index) => encode_integer(index, 4, 0x00, out),
        None => {
            out.push(0x00);
            encode_string(name, out);
        }
    }
    encode_string(value, out);
}

/// The HPACK static table (RFC 7541 Appendix A); entry i is index i + 1.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;
    use httlib_hpack::{Decoder as RefDecoder, Encoder as RefEncoder};

    const HUFFMAN: u8 = RefEncoder::HUFFMAN_NAME | RefEncoder::HUFFMAN_VALUE;
    const INDEXING: u8 = RefEncoder::WITH_INDEXING | RefEncoder::BEST_FORMAT;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The HPACK bytes of `fields` from the client's encoder, every field with `flags`.
    fn hpack(enc: &mut RefEncoder<'_>, fields: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            enc.encode((n.to_vec(), v.to_vec(), flags), &mut out)
                .expect("encode");
        }
        out
    }

    fn request(authority: Option<&[u8]>) -> Vec<(&'static [u8], Vec<u8>)> {
        let mut fields: Vec<(&'static [u8], Vec<u8>)> = vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/Probe".to_vec()),
        ];
        if let Some(a) = authority {
            fields.push((b":authority", a.to_vec()));
        }
        fields.extend([
            (&b"te"[..], b"trailers".to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"user-agent", b"grpc-python/1.85.3 grpc-c/50.0.0".to_vec()),
            (b"grpc-accept-encoding", b"identity,deflate,gzip".to_vec()),
        ]);
        fields
    }

    fn as_refs<'a>(fields: &'a [(&'static [u8], Vec<u8>)]) -> Vec<(&'static [u8], &'a [u8])> {
        fields.iter().map(|(n, v)| (*n, &v[..])).collect()
    }

    /// Feeds `input` in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> (io::Result<Vec<u8>>, Rewriter) {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            if let Err(e) = r.feed(piece, &mut out) {
                return (Err(e), r);
            }
        }
        r.end(&mut out);
        (Ok(out), r)
    }

    #[derive(Debug, PartialEq)]
    enum Item {
        Headers {
            stream: u32,
            end_stream: bool,
            fields: Fields,
        },
        /// Any other frame, as it is on the wire.
        Other(Vec<u8>),
    }

    /// What an HTTP/2 server reads from `bytes`: the frames, header blocks decoded by an HPACK
    /// decoder of another implementation. Checks the framing of header blocks on the way.
    fn server_view(bytes: &[u8]) -> Vec<Item> {
        assert_eq!(&bytes[..24], PREFACE, "the preface");
        let mut rest = &bytes[24..];
        let mut decoder = RefDecoder::default();
        let mut items = Vec::new();
        let mut open: Option<(u32, bool, Vec<u8>)> = None;
        while !rest.is_empty() {
            assert!(rest.len() >= 9, "a cut frame header");
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let whole = &rest[..9 + len];
            let payload = &whole[9..];
            rest = &rest[9 + len..];
            match kind {
                HEADERS => {
                    assert!(open.is_none(), "HEADERS inside a header block");
                    let frag = header_fragment(flags, payload).expect("padding fits");
                    open = Some((stream, flags & END_STREAM != 0, frag.to_vec()));
                }
                CONTINUATION => {
                    let block = open.as_mut().expect("CONTINUATION without HEADERS");
                    assert_eq!(block.0, stream);
                    assert_eq!(flags & !END_HEADERS, 0, "CONTINUATION flags");
                    block.2.extend_from_slice(payload);
                }
                _ => {
                    assert!(open.is_none(), "a frame inside a header block");
                    items.push(Item::Other(whole.to_vec()));
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let (stream, end_stream, mut frag) = open.take().unwrap();
                let mut decoded = Vec::new();
                decoder.decode(&mut frag, &mut decoded).expect("decodes");
                items.push(Item::Headers {
                    stream,
                    end_stream,
                    fields: decoded.into_iter().map(|(n, v, _)| (n, v)).collect(),
                });
            }
        }
        assert!(open.is_none(), "an unfinished header block");
        items
    }

    /// What the server must see for what the client sent: the same, with every refused
    /// authority replaced.
    fn fixed(items: Vec<Item>) -> Vec<Item> {
        items
            .into_iter()
            .map(|item| match item {
                Item::Headers {
                    stream,
                    end_stream,
                    fields,
                } => Item::Headers {
                    stream,
                    end_stream,
                    fields: fields
                        .into_iter()
                        .map(|(n, v)| {
                            if n == b":authority" && !authority_ok(&v) {
                                (n, b"localhost".to_vec())
                            } else {
                                (n, v)
                            }
                        })
                        .collect(),
                },
                other => other,
            })
            .collect()
    }

    /// Frames of a connection: settings, two requests with their DATA, the second one using
    /// the dynamic table when `flags` index, a ping.
    fn connection(authority: Option<&[u8]>, flags: u8) -> Vec<u8> {
        let mut enc = RefEncoder::default();
        let mut c = PREFACE.to_vec();
        c.extend(frame(0x4, 0, 0, &[0, 4, 0, 0x40, 0, 0]));
        c.extend(frame(0x8, 0, 0, &[0, 0x0f, 0, 1]));
        let req = request(authority);
        let probe = [0u8, 0, 0, 0, 0];
        for stream in [1, 3] {
            let block = hpack(&mut enc, &as_refs(&req), flags);
            c.extend(frame(HEADERS, END_HEADERS, stream, &block));
            c.extend(frame(0x0, END_STREAM, stream, &probe));
        }
        c.extend(frame(0x6, 0, 0, b"12345678"));
        c
    }

    const REFUSED: [&[u8]; 4] = [
        b"/var/lib/kubelet/plugins/stowage.csi.dev/csi.sock",
        b"%2Fvar%2Flib%2Fkubelet%2Fplugins%2Fstowage.csi.dev%2Fcsi.sock",
        b"tmp%2Fstowage-it-1%2Fcsi.sock",
        b"",
    ];

    #[test]
    fn accepted_authorities_pass_byte_for_byte() {
        for authority in [None, Some(&b"localhost"[..]), Some(b"localhost:50051")] {
            for flags in [0, HUFFMAN, INDEXING, HUFFMAN | INDEXING] {
                let input = connection(authority, flags);
                for step in [1, 7, input.len()] {
                    let (out, r) = run(&input, step);
                    assert_eq!(
                        out.unwrap(),
                        input,
                        "{authority:?} flags {flags:#x} step {step}"
                    );
                    assert!(!r.rewriting() && !r.passing_through());
                }
            }
        }
    }

    #[test]
    fn refused_authorities_become_localhost_and_the_rest_is_kept() {
        for authority in REFUSED {
            assert!(!authority_ok(authority));
            for flags in [0, HUFFMAN, INDEXING, HUFFMAN | INDEXING] {
                let input = connection(Some(authority), flags);
                let expected = fixed(server_view(&input));
                for step in [1, 2, 9, 10, input.len()] {
                    let (out, r) = run(&input, step);
                    let out = out.unwrap();
                    assert!(r.rewriting());
                    assert_eq!(server_view(&out), expected, "flags {flags:#x} step {step}");
                }
                // The server's table is never used again: nothing adds to it.
                let (out, _) = run(&input, input.len());
                for item in split_blocks(&out.unwrap()) {
                    assert_no_indexing(&item);
                }
            }
        }
    }

    /// The HPACK bytes of each header block in `bytes` (single-frame blocks).
    fn split_blocks(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut rest = &bytes[24..];
        let mut blocks = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if rest[3] == HEADERS {
                blocks.push(rest[9..9 + len].to_vec());
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    /// Walks an HPACK block written by the rewriter: only static indices and literals
    /// without indexing.
    fn assert_no_indexing(block: &[u8]) {
        let mut at = 0;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                let (index, used) = decode_integer(&block[at..], 7).unwrap();
                assert!((1..=61).contains(&index), "a dynamic table index {index}");
                at += used;
                continue;
            }
            assert_eq!(b & 0xf0, 0, "only literals without indexing");
            let (index, used) = decode_integer(&block[at..], 4).unwrap();
            assert!(index <= 61);
            at += used;
            let strings = if index == 0 { 2 } else { 1 };
            for _ in 0..strings {
                assert_eq!(block[at] & 0x80, 0, "no Huffman coding written");
                let (len, used) = decode_integer(&block[at..], 7).unwrap();
                at += used + len;
            }
        }
        assert_eq!(at, block.len());
    }

    #[test]
    fn continuation_padding_priority_and_large_blocks() {
        let mut enc = RefEncoder::default();
        let big = vec![b'x'; 40_000];
        let req = request(Some(REFUSED[1]));
        let mut fields = as_refs(&req);
        fields.push((b"x-big-metadata", &big));
        let block = hpack(&mut enc, &fields, HUFFMAN | INDEXING);
        // HEADERS (padded, with priority) + two CONTINUATION frames, END_STREAM on HEADERS.
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 16]); // exclusive dependency on 0, weight
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_STREAM | PADDED | PRIORITY, 5, &payload));
        input.extend(frame(CONTINUATION, 0, 5, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, c));
        input.extend(frame(0x3, 0, 5, &[0, 0, 0, 8]));
        let expected = fixed(server_view(&input));
        for step in [1, 4096, input.len()] {
            let (out, r) = run(&input, step);
            let out = out.unwrap();
            assert!(r.rewriting());
            assert_eq!(server_view(&out), expected);
            // The re-encoded block (over 40 KB) went out in frames of at most 16384 bytes.
            let mut rest = &out[24..];
            let mut frames = Vec::new();
            while !rest.is_empty() {
                let len =
                    usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                assert!(len <= MAX_EMITTED_PAYLOAD);
                frames.push((rest[3], rest[4]));
                rest = &rest[9 + len..];
            }
            assert_eq!(
                frames,
                [
                    (HEADERS, END_STREAM),
                    (CONTINUATION, 0),
                    (CONTINUATION, END_HEADERS),
                    (0x3, 0)
                ]
            );
        }
    }

    #[test]
    fn dynamic_table_and_size_updates_after_a_rewrite() {
        let mut enc = RefEncoder::default();
        let mut input = PREFACE.to_vec();
        let first = request(Some(REFUSED[2]));
        let block = hpack(&mut enc, &as_refs(&first), HUFFMAN | INDEXING);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        // Same fields again: all from the dynamic table, plus a new indexed one.
        let mut second = as_refs(&first);
        second.push((b"x-request-id", b"aaaaaaaaaaaaaaaa"));
        let block = hpack(&mut enc, &second, HUFFMAN | INDEXING);
        input.extend(frame(HEADERS, END_HEADERS, 3, &block));
        // The client shrinks its table (evicting entries), then fills it again.
        let mut block = Vec::new();
        enc.update_max_dynamic_size(100, &mut block).unwrap();
        block.extend(hpack(&mut enc, &second, HUFFMAN | INDEXING));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &block));
        // A block of nothing but a size update back to the default, then a request.
        let mut block = Vec::new();
        enc.update_max_dynamic_size(4096, &mut block).unwrap();
        input.extend(frame(HEADERS, END_HEADERS, 7, &block));
        let block = hpack(&mut enc, &second, INDEXING);
        input.extend(frame(HEADERS, END_HEADERS, 9, &block));
        let expected = fixed(server_view(&input));
        for step in [1, 3, input.len()] {
            let (out, r) = run(&input, step);
            assert!(r.rewriting());
            assert_eq!(server_view(&out.unwrap()), expected);
        }
    }

    #[test]
    fn a_block_the_client_encoded_before_the_rewrite_still_decodes() {
        // Request 1 fine (its fields enter both tables), request 2 refused, request 3 fine
        // again but using entries of request 1 and 2 from the client's table.
        let mut enc = RefEncoder::default();
        let mut input = PREFACE.to_vec();
        for (stream, authority) in [(1, &b"localhost"[..]), (3, REFUSED[0]), (5, b"localhost")] {
            let block = hpack(&mut enc, &as_refs(&request(Some(authority))), INDEXING);
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
        }
        let (out, r) = run(&input, 5);
        let out = out.unwrap();
        assert!(r.rewriting());
        let expected = fixed(server_view(&input));
        assert_eq!(server_view(&out), expected);
        // Request 1 went out as it came.
        let first_len = 24 + 9 + usize::from(input[26]);
        assert_eq!(out[..first_len], input[..first_len]);
    }

    #[test]
    fn malformed_streams_pass_through_for_the_server_to_judge() {
        // Not HTTP/2 at all.
        let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (out, r) = run(&junk, 3);
        assert_eq!(out.unwrap(), junk);
        assert!(r.passing_through());

        // HPACK garbage before any rewrite: forwarded, then nothing is inspected.
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        input.extend(frame(0x0, 0, 1, b"abc"));
        let (out, r) = run(&input, 1);
        assert_eq!(out.unwrap(), input);
        assert!(r.passing_through());

        // A DATA frame inside a header block, and a CONTINUATION out of nowhere.
        let mut enc = RefEncoder::default();
        let block = hpack(&mut enc, &as_refs(&request(Some(REFUSED[0]))), 0);
        for intruder in [
            frame(0x0, 0, 1, b"abc"),
            frame(HEADERS, END_HEADERS, 3, &block),
        ] {
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, 0, 1, &block[..5]));
            input.extend(intruder);
            input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[5..]));
            let (out, r) = run(&input, 2);
            assert_eq!(out.unwrap(), input);
            assert!(r.passing_through());
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block));
        let (out, _) = run(&input, 2);
        assert_eq!(out.unwrap(), input);

        // Padding longer than the frame.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        let (out, r) = run(&input, 1);
        assert_eq!(out.unwrap(), input);
        assert!(r.passing_through());

        // A size update over the server's limit.
        let mut input = PREFACE.to_vec();
        let mut block = Vec::new();
        encode_integer(8192, 5, 0x20, &mut block);
        block.push(0x82);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (out, r) = run(&input, 1);
        assert_eq!(out.unwrap(), input);
        assert!(r.passing_through());
    }

    #[test]
    fn held_bytes_go_on_at_the_end_of_the_stream() {
        let mut enc = RefEncoder::default();
        let block = hpack(&mut enc, &as_refs(&request(Some(REFUSED[1]))), 0);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(&frame(CONTINUATION, END_HEADERS, 1, &[0x82])[..5]);
        let (out, _) = run(&input, 3);
        assert_eq!(out.unwrap(), input);
    }

    #[test]
    fn header_blocks_are_capped() {
        let chunk = vec![0u8; 16_000];
        let mut flood = PREFACE.to_vec();
        flood.extend(frame(HEADERS, 0, 1, &chunk));
        for _ in 0..70 {
            flood.extend(frame(CONTINUATION, 0, 1, &chunk));
        }
        // Before any rewrite the server judges the block itself.
        let (out, r) = run(&flood, 65_536);
        assert_eq!(out.unwrap(), flood);
        assert!(r.passing_through());

        // After one, the connection is closed.
        let mut enc = RefEncoder::default();
        let block = hpack(&mut enc, &as_refs(&request(Some(REFUSED[1]))), 0);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(&flood[24..]);
        let (out, _) = run(&input, 65_536);
        assert_eq!(out.unwrap_err().kind(), io::ErrorKind::InvalidData);

        // So is a block that cannot be decoded after one.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        let (out, _) = run(&input, 1);
        assert_eq!(out.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn random_input_never_panics() {
        // xorshift: a fixed sequence of header blocks, frame headers and junk.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let mut input = PREFACE.to_vec();
            let frames = next() % 6;
            for _ in 0..frames {
                let len = (next() % 40) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let kind = [HEADERS, CONTINUATION, 0x0, 0x4][(next() % 4) as usize];
                let flags = next() as u8;
                input.extend(frame(kind, flags, (next() % 4) as u32, &payload));
            }
            let step = 1 + (next() % 13) as usize;
            let _ = run(&input, step);
        }
    }

    /// Stripping Huffman coding keeps what a decoder reads: every representation kind, with
    /// and without Huffman strings, decodes to the same fields through the same table.
    #[test]
    fn plain_literals_decode_as_the_huffman_ones() {
        let mut enc = RefEncoder::default();
        let mut block = Vec::new();
        for flags in [
            HUFFMAN | INDEXING,
            HUFFMAN,
            RefEncoder::NEVER_INDEXED | HUFFMAN,
            INDEXING,
            0,
        ] {
            block.extend(hpack(
                &mut enc,
                &as_refs(&request(Some(b"%2Frun%2Fcsi.sock"))),
                flags,
            ));
        }
        let plain = without_huffman(&block).unwrap();
        assert_ne!(plain, block, "there were Huffman strings to strip");
        let mut a = RefDecoder::default();
        let mut b = RefDecoder::default();
        let (mut x, mut y) = (block.clone(), plain.clone());
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        a.decode(&mut x, &mut fa).unwrap();
        b.decode(&mut y, &mut fb).unwrap();
        assert_eq!(fa, fb);
        assert_eq!(
            without_huffman(&plain).unwrap(),
            plain,
            "plain input is kept as it is"
        );
        for cut in 1..block.len() {
            // A cut block is an error or a shorter block, never a panic.
            let _ = without_huffman(&block[..cut]);
        }
    }

    #[test]
    fn integers_round_trip() {
        for prefix in [4u8, 5, 6, 7] {
            for value in [
                0usize, 1, 14, 15, 16, 30, 31, 62, 63, 126, 127, 128, 1337, 70_000,
            ] {
                let mut buf = Vec::new();
                encode_integer(value, prefix, 0, &mut buf);
                assert_eq!(decode_integer(&buf, prefix), Some((value, buf.len())));
            }
        }
        assert_eq!(decode_integer(&[0x1f, 0xff], 5), None);
        assert_eq!(
            decode_integer(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 5),
            None
        );
    }

    #[tokio::test]
    async fn the_adapter_reads_what_the_rewriter_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let input = connection(Some(REFUSED[1]), HUFFMAN | INDEXING);
        let (expected, _) = run(&input, input.len());
        let (mut client, server) = tokio::io::duplex(64);
        let mut adapter = AuthorityFix::new(server);
        let sent = input.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(11) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        adapter.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected.unwrap());
    }
}

//! Clients of every gRPC implementation are served over the Unix socket, whatever they send
//! as `:authority`: absent, `localhost`, the raw socket path (grpc-java, older grpc-go), the
//! percent-encoded path (gRPC C-core since 1.57: Python, C++, Ruby).
//!
//! Two tiers: hand-made HTTP/2 frames over a raw socket (always runs), and the real Python
//! `grpcio` client (installed on first use into a private virtualenv; skipped when it cannot
//! be installed).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

macro_rules! loud {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn socket_of(h: &Harness) -> PathBuf {
    PathBuf::from(h.endpoint.trim_start_matches("unix://"))
}

/// The `:authority` values clients send for a socket at `sock`.
fn authorities(sock: &Path) -> Vec<(&'static str, Option<String>)> {
    let raw = sock.to_str().expect("UTF-8 socket path").to_owned();
    let encoded = raw.replace('/', "%2F");
    vec![
        ("absent", None),
        ("localhost", Some("localhost".into())),
        ("raw path", Some(raw)),
        ("percent-encoded path", Some(encoded.clone())),
        (
            "percent-encoded path without leading slash",
            Some(encoded.trim_start_matches("%2F").to_owned()),
        ),
    ]
}

/// A frame as read from the server.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn read_frame(s: &mut UnixStream) -> Frame {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)
        .expect("a frame header from the server");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("a frame payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// What the server answered on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    reset: Option<u32>,
}

/// Sends Probe on streams 1 and 3 of one connection, the way gRPC C-core encodes headers
/// (Huffman-coded, added to the dynamic table, so the second request mostly refers to it),
/// and collects the answers.
fn probe_twice(sock: &Path, authority: Option<&str>) -> Vec<Answer> {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut enc = httlib_hpack::Encoder::default();
    let flags = httlib_hpack::Encoder::HUFFMAN_NAME
        | httlib_hpack::Encoder::HUFFMAN_VALUE
        | httlib_hpack::Encoder::WITH_INDEXING
        | httlib_hpack::Encoder::BEST_FORMAT;
    let mut fields: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/csi.v1.Identity/Probe"),
    ];
    if let Some(a) = authority {
        fields.push((":authority", a));
    }
    fields.extend([
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("user-agent", "frame-test/1"),
    ]);
    for stream in [1u32, 3] {
        let mut block = Vec::new();
        for (n, v) in &fields {
            enc.encode(
                (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags),
                &mut block,
            )
            .expect("encode");
        }
        out.extend(frame(HEADERS, END_HEADERS, stream, &block));
        // An empty ProbeRequest, gRPC-framed: not compressed, length 0.
        out.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    }
    s.write_all(&out).expect("send the requests");

    let mut dec = httlib_hpack::Decoder::default();
    let mut answers = [Answer::default(), Answer::default()];
    let mut done = [false, false];
    let mut block: Option<(u32, Vec<u8>)> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(done[0] && done[1]) {
        assert!(Instant::now() < deadline, "no complete answer in 20 s");
        let f = read_frame(&mut s);
        let slot = match f.stream {
            1 => Some(0),
            3 => Some(1),
            _ => None,
        };
        match f.kind {
            SETTINGS if f.flags & 0x1 == 0 => s.write_all(&frame(SETTINGS, 0x1, 0, &[])).unwrap(),
            GOAWAY => panic!("the server closed the connection: {:?}", f.payload),
            RST_STREAM => {
                let i = slot.expect("a reset of a stream we opened");
                let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                answers[i].reset = Some(code);
                done[i] = true;
            }
            DATA => {
                let i = slot.expect("data on a stream we opened");
                answers[i].data.extend_from_slice(&f.payload);
                done[i] |= f.flags & END_STREAM != 0;
            }
            HEADERS | CONTINUATION => {
                let (stream, mut bytes) = block.take().unwrap_or((f.stream, Vec::new()));
                // Responses are small: no padding or priority from this server.
                bytes.extend_from_slice(&f.payload);
                if f.flags & END_HEADERS == 0 {
                    block = Some((stream, bytes));
                    continue;
                }
                let mut decoded = Vec::new();
                dec.decode(&mut bytes, &mut decoded)
                    .expect("decode a response block");
                let i = match stream {
                    1 => 0,
                    3 => 1,
                    other => panic!("headers on stream {other}"),
                };
                answers[i]
                    .headers
                    .extend(decoded.into_iter().map(|(n, v, _)| {
                        (
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    }));
                done[i] |= f.flags & END_STREAM != 0;
            }
            _ => {}
        }
    }
    answers.into()
}

#[tokio::test]
async fn hand_made_frames_with_any_authority_are_served() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let sock = socket_of(&h);
        for (what, authority) in authorities(&sock) {
            let answers = tokio::task::spawn_blocking({
                let sock = sock.clone();
                let authority = authority.clone();
                move || probe_twice(&sock, authority.as_deref())
            })
            .await
            .unwrap();
            for (i, a) in answers.iter().enumerate() {
                assert_eq!(
                    a.reset,
                    None,
                    "{what}: request {i} was reset; log:\n{}",
                    h.log_text()
                );
                let status = a.headers.iter().find(|(n, _)| n == "grpc-status");
                assert_eq!(
                    status.map(|(_, v)| v.as_str()),
                    Some("0"),
                    "{what}: request {i}: {:?}",
                    a.headers
                );
                // ProbeResponse { ready: Some(true) }, gRPC-framed.
                assert_eq!(a.data, [0, 0, 0, 0, 4, 0x0a, 0x02, 0x08, 0x01], "{what}");
            }
        }
    })
    .await;
}

/// The pinned grpcio release the Python client test installs.
const GRPCIO_VERSION: &str = "1.85.3";

/// A Python interpreter that imports `grpc`, installing grpcio on first use into a private
/// virtualenv under the user's cache directory (built beside its final place and moved there
/// whole). `Err` says why there is none.
fn grpcio_python() -> Result<PathBuf, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp/.cache"));
    let venv = cache.join(format!("stowage/grpcio-{GRPCIO_VERSION}"));
    let python = venv.join("bin/python");
    let imports = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "import grpc, sys; sys.exit(0 if grpc.__version__ == sys.argv[1] else 1)",
            ])
            .arg(GRPCIO_VERSION)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports(&python) {
        return Ok(python);
    }
    std::fs::create_dir_all(venv.parent().unwrap()).map_err(|e| format!("cache dir: {e}"))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("grpcio-{GRPCIO_VERSION}.tmp."))
        .tempdir_in(venv.parent().unwrap())
        .map_err(|e| format!("temporary venv dir: {e}"))?;
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(tmp.path())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    loud!(
        "installing grpcio=={GRPCIO_VERSION} into {}",
        venv.display()
    );
    let pip = Command::new(tmp.path().join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("grpcio=={GRPCIO_VERSION}"))
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip install failed: {}",
            String::from_utf8_lossy(&pip.stderr).trim()
        ));
    }
    let _ = std::fs::remove_dir_all(&venv);
    let kept = tmp.keep();
    std::fs::rename(&kept, &venv).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        format!("moving the venv in place: {e}")
    })?;
    if imports(&python) {
        Ok(python)
    } else {
        Err("grpcio was installed but cannot be imported".into())
    }
}

/// Calls Identity/Probe and Identity/GetPluginInfo through grpcio with raw-bytes stubs, once
/// per authority setting; prints one line per call and exits non-zero on the first failure.
const PY_CLIENT: &str = r#"
import sys
import grpc

sock, driver = sys.argv[1], sys.argv[2].encode()
encoded = sock.replace("/", "%2F")
variants = [
    ("default (percent-encoded path)", []),
    ("localhost", [("grpc.default_authority", "localhost")]),
    ("raw path", [("grpc.default_authority", sock)]),
    ("percent-encoded path", [("grpc.default_authority", encoded)]),
    ("percent-encoded, no leading slash", [("grpc.default_authority", encoded[3:])]),
    ("/percent%2Fencoded", [("grpc.default_authority", "/percent%2Fencoded")]),
]
same = lambda b: b
failed = False
for name, options in variants:
    with grpc.insecure_channel("unix://" + sock, options=options) as channel:
        probe = channel.unary_unary("/csi.v1.Identity/Probe",
                                    request_serializer=same, response_deserializer=same)
        info = channel.unary_unary("/csi.v1.Identity/GetPluginInfo",
                                   request_serializer=same, response_deserializer=same)
        try:
            ready = probe(b"", timeout=20)
            plugin = info(b"", timeout=20)
        except grpc.RpcError as e:
            print(f"{name}: FAILED {e.code()}: {e.details()}")
            failed = True
            continue
        # ProbeResponse{ready: true}; GetPluginInfoResponse names the driver.
        good = ready == bytes.fromhex("0a020801") and driver in plugin
        print(f"{name}: {'ok' if good else 'WRONG'} probe={ready.hex()} info={plugin!r}")
        failed |= not good
sys.exit(1 if failed else 0)
"#;

/// Runs the Python client (killed after 90 s); its output (stdout and stderr) and whether
/// it succeeded.
fn run_bounded(python: &Path, sock: &Path, report: &Path) -> (Vec<u8>, bool) {
    let file = std::fs::File::create(report).expect("client report file");
    let mut child = Command::new(python)
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(sock)
        .arg(DRIVER)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("run python");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python client did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (std::fs::read(report).unwrap_or_default(), ok)
}

#[tokio::test]
async fn python_grpcio_is_served_with_any_authority() {
    let python = match tokio::task::spawn_blocking(grpcio_python).await.unwrap() {
        Ok(p) => p,
        Err(why) => {
            loud!(
                "SKIPPED (grpcio not installable: {why}): python_grpcio_is_served_with_any_authority"
            );
            return;
        }
    };
    bounded(async {
        let h = Harness::start(&[]).await;
        let sock = socket_of(&h);
        let out = tokio::task::spawn_blocking({
            let report = h.dir.path().join("python-client.out");
            let sock = sock.clone();
            move || run_bounded(&python, &sock, &report)
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.0);
        assert!(
            out.1,
            "grpcio calls failed:\n{stdout}\ndriver log:\n{}",
            h.log_text()
        );
        assert_eq!(
            stdout.lines().filter(|l| l.contains(": ok ")).count(),
            6,
            "{stdout}"
        );
    })
    .await;
}

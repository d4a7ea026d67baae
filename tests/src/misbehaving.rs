//! A backend that does not play along, for the misbehaving-backend suite: it serves
//! `/health` and `/v1/models` properly (so the gateway routes to it) and answers chat
//! completions in one chosen wrong way, written byte by byte on a raw socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the backend answers `POST /v1/chat/completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// A stream that never ends.
    EndlessStream,
    /// A whole, valid stream with usage, one byte per HTTP chunk.
    OneByteChunks,
    /// A valid JSON answer this many bytes long, in one body.
    HugeBody(usize),
    /// A valid JSON answer without a usage block.
    NoUsage,
    /// A whole, valid stream that ends without a usage chunk (though one was asked for).
    StreamWithoutUsage,
    /// A valid JSON answer, gzip-compressed although nobody asked for it.
    Gzip,
    /// 200 with a body that is not JSON.
    InvalidJson,
    /// Every answer has this status.
    Status(u16),
    /// Reads the request and never answers.
    Silent,
    /// Starts a stream, then resets the connection.
    ResetMidStream,
    /// Starts a JSON answer (its header promising the whole length), then resets the
    /// connection half-way through the body.
    ResetMidJson,
}

/// What a backend that reports no usage answers (as one JSON body, or word by word).
pub const UNREPORTED_ANSWER: &str =
    "Locks raise and lower boats between stretches of water at different levels.";

/// The prompt and completion tokens the backend reports when it reports usage.
pub const REPORTED: (u64, u64) = (7, 5);

pub struct Misbehaving {
    pub url: String,
    chats: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Misbehaving {
    pub async fn start(behaviour: Behaviour) -> Misbehaving {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let chats = Arc::new(AtomicU64::new(0));
        let counted = chats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let chats = counted.clone();
                tokio::spawn(async move {
                    let _ = connection(tcp, behaviour, chats).await;
                });
            }
        });
        Misbehaving { url, chats, task }
    }

    /// Chat completion requests it received.
    pub fn chats(&self) -> u64 {
        self.chats.load(Ordering::Relaxed)
    }
}

impl Drop for Misbehaving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(
    mut tcp: TcpStream,
    behaviour: Behaviour,
    chats: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    loop {
        let Some((path, body_len, head_len)) = read_head(&mut tcp, &mut buffer).await? else {
            return Ok(());
        };
        while buffer.len() < head_len + body_len {
            let mut more = [0u8; 65536];
            let n = tcp.read(&mut more).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&more[..n]);
        }
        buffer.drain(..head_len + body_len);
        match path.as_str() {
            "/health" => respond(&mut tcp, 200, "application/json", b"{\"status\":\"ok\"}").await?,
            "/v1/models" => {
                let models = br#"{"object":"list","data":[{"id":"sim-chat","object":"model","created":0,"owned_by":"test"}]}"#;
                respond(&mut tcp, 200, "application/json", models).await?
            }
            "/v1/chat/completions" => {
                chats.fetch_add(1, Ordering::Relaxed);
                return misbehave(tcp, behaviour).await;
            }
            _ => respond(&mut tcp, 404, "application/json", b"{}").await?,
        }
    }
}

/// The request line's path, the body length and the head's length, once a whole head is in
/// `buffer` (read from `tcp` as needed); `None` when the connection closed. Also for other
/// raw-socket backends in the tests.
pub async fn read_head(
    tcp: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<(String, usize, usize)>> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            return Ok(Some((path, length, end + 4)));
        }
        let mut more = [0u8; 8192];
        let n = tcp.read(&mut more).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&more[..n]);
    }
}

async fn respond(tcp: &mut TcpStream, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body).await
}

fn completion(usage: bool, content: &str) -> String {
    let usage = if usage {
        format!(
            ",\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}",
            REPORTED.0,
            REPORTED.1,
            REPORTED.0 + REPORTED.1
        )
    } else {
        String::new()
    };
    format!(
        "{{\"id\":\"chatcmpl-x\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"sim-chat\",\
         \"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{content}\"}},\
         \"finish_reason\":\"stop\"}}]{usage}}}"
    )
}

fn chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"sim-chat\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n"
    )
}

fn whole_stream() -> String {
    let mut s = String::new();
    for _ in 0..REPORTED.1 {
        s.push_str(&chunk("tok "));
    }
    s.push_str(&format!(
        "data: {{\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"sim-chat\",\
         \"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        REPORTED.0,
        REPORTED.1,
        REPORTED.0 + REPORTED.1
    ));
    s
}

const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

async fn http_chunk(tcp: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    tcp.write_all(format!("{:x}\r\n", bytes.len()).as_bytes())
        .await?;
    tcp.write_all(bytes).await?;
    tcp.write_all(b"\r\n").await
}

async fn misbehave(mut tcp: TcpStream, behaviour: Behaviour) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    match behaviour {
        Behaviour::EndlessStream => {
            tcp.write_all(STREAM_HEAD).await?;
            loop {
                http_chunk(&mut tcp, chunk("more ").as_bytes()).await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Behaviour::OneByteChunks => {
            tcp.write_all(STREAM_HEAD).await?;
            for byte in whole_stream().as_bytes() {
                http_chunk(&mut tcp, &[*byte]).await?;
            }
            tcp.write_all(b"0\r\n\r\n").await
        }
        Behaviour::HugeBody(size) => {
            let frame = completion(true, "");
            let filler = size.saturating_sub(frame.len());
            let (before, after) = frame.split_at(frame.find("\"content\":\"").unwrap() + 11);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                frame.len() + filler
            );
            tcp.write_all(head.as_bytes()).await?;
            tcp.write_all(before.as_bytes()).await?;
            let block = vec![b'a'; 1 << 16];
            let mut left = filler;
            while left > 0 {
                let n = left.min(block.len());
                tcp.write_all(&block[..n]).await?;
                left -= n;
            }
            tcp.write_all(after.as_bytes()).await
        }
        Behaviour::NoUsage => {
            respond(
                &mut tcp,
                200,
                "application/json",
                completion(false, UNREPORTED_ANSWER).as_bytes(),
            )
            .await
        }
        Behaviour::Gzip => {
            let body = gzip_stored(completion(true, "hi").as_bytes());
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            tcp.write_all(head.as_bytes()).await?;
            tcp.write_all(&body).await
        }
        Behaviour::InvalidJson => {
            respond(
                &mut tcp,
                200,
                "application/json",
                b"{\"id\": \"x\", \"choices\": [",
            )
            .await
        }
        Behaviour::Status(code) => {
            let body = format!(
                "{{\"error\":{{\"message\":\"status {code}\",\"type\":\"server_error\"}}}}"
            );
            respond(&mut tcp, code, "application/json", body.as_bytes()).await
        }
        Behaviour::Silent => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        Behaviour::StreamWithoutUsage => {
            tcp.write_all(STREAM_HEAD).await?;
            for word in UNREPORTED_ANSWER.split_inclusive(' ') {
                http_chunk(&mut tcp, chunk(word).as_bytes()).await?;
            }
            http_chunk(&mut tcp, b"data: [DONE]\n\n").await?;
            tcp.write_all(b"0\r\n\r\n").await
        }
        Behaviour::ResetMidJson => {
            let body = completion(true, "half of this answer never arrives");
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            tcp.write_all(head.as_bytes()).await?;
            tcp.write_all(&body.as_bytes()[..body.len() / 2]).await?;
            reset(tcp).await
        }
        Behaviour::ResetMidStream => {
            tcp.write_all(STREAM_HEAD).await?;
            for _ in 0..3 {
                http_chunk(&mut tcp, chunk("tok ").as_bytes()).await?;
            }
            reset(tcp).await
        }
    }
}

/// Sends what was written, then resets the connection: SO_LINGER 0 makes closing send a
/// reset, not an orderly end (and it cannot block).
async fn reset(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.flush().await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    #[allow(deprecated)]
    tcp.set_linger(Some(Duration::ZERO))?;
    drop(tcp);
    Ok(())
}

/// `bytes` as a gzip member of stored (uncompressed) deflate blocks: valid gzip that needs no
/// compressor.
fn gzip_stored(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let blocks: Vec<&[u8]> = bytes.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(bytes).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

//! What a backend receives: the gateway reads a request's body whole before it picks a backend
//! (policy needs it), so it sends the backend the request header and body together, in one
//! write, as nginx does with request buffering on (vendor/README.md, patch 5). A backend sees
//! each small request in one TCP segment, and a large body arrives whole.

use serde_json::{json, Value};
use sluice_e2e::misbehaving::read_head;
use sluice_e2e::{Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One chat request as the backend received it.
#[derive(Debug, Clone)]
struct Received {
    /// TCP segments with data that the request (header and body) came in.
    segments: u32,
    body: Vec<u8>,
}

/// A backend on a raw socket that answers health checks, the model list and chat completions,
/// and notes for each chat request how many data segments it arrived in (the kernel's
/// `tcpi_data_segs_in`, counted per connection).
struct CountingBackend {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingBackend {
    async fn start() -> CountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let noted = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let noted = noted.clone();
                tokio::spawn(async move {
                    let _ = serve(tcp, noted).await;
                });
            }
        });
        CountingBackend {
            url,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Data segments this socket has received since it was opened.
fn data_segments_in(tcp: &TcpStream) -> u32 {
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed struct it is given.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_data_segs_in
    }
}

async fn serve(mut tcp: TcpStream, noted: Arc<Mutex<Vec<Received>>>) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut segments_before = 0;
    loop {
        let Some((path, length, head_end)) = read_head(&mut tcp, &mut buffer).await? else {
            return Ok(());
        };
        while buffer.len() < head_end + length {
            let mut more = [0u8; 65536];
            let n = tcp.read(&mut more).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&more[..n]);
        }
        let body = buffer[head_end..head_end + length].to_vec();
        buffer.drain(..head_end + length);
        let segments = data_segments_in(&tcp);
        let answer = match path.as_str() {
            "/health" => json!({"status": "ok"}),
            "/v1/models" => {
                json!({"object": "list", "data": [{"id": SIM_MODEL, "object": "model", "created": 0, "owned_by": "test"}]})
            }
            _ => {
                noted.lock().unwrap().push(Received {
                    segments: segments - segments_before,
                    body,
                });
                json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": SIM_MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Weirs."}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
            }
        };
        segments_before = segments;
        let answer = answer.to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        tcp.write_all(response.as_bytes()).await?;
    }
}

#[tokio::test]
async fn a_request_reaches_the_backend_header_and_body_in_one_segment_and_a_large_body_whole() {
    let backend = CountingBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        max_body_bytes: 4 << 20,
        ..GatewayOptions::for_urls(
            vec![backend.url.clone()],
            StoreKind::Embedded(dir.path().to_owned()),
        )
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let chat = |content: String| {
        gw.http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("cache-control", "no-cache")
            .json(&json!({"model": SIM_MODEL, "max_tokens": 8,
                "messages": [{"role": "user", "content": content}]}))
    };

    // Small requests, on a new backend connection and then on the reused one.
    for question in ["Where do rivers start?", "And where do they end?"] {
        let answer = chat(question.into()).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "Weirs.");
    }
    // A body far larger than a segment (and than pingora's 64 KiB retry buffer): it arrives
    // whole, in the many segments it needs.
    let long = "a river runs to the sea ".repeat(40_000);
    let answer = chat(long.clone()).send().await.unwrap();
    assert_eq!(answer.status(), 200);

    let received = backend.received();
    assert_eq!(received.len(), 3, "{received:?}");
    for small in &received[..2] {
        assert_eq!(
            small.segments, 1,
            "a small request took {} segments to reach the backend (header and body apart?)",
            small.segments
        );
    }
    let large: Value = serde_json::from_slice(&received[2].body).expect("the large body, whole");
    assert_eq!(large["messages"][0]["content"], long.as_str());
    assert!(received[2].segments > 1);
}

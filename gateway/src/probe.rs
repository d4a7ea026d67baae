//! How does the gateway ask a backend about itself (health, load, the models it serves)?
//! Through pingora's connector with the peer its requests use, so that a probe speaks TLS,
//! trusts, and carries credentials exactly as the requests it stands for do.

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::v1::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::time::Duration;

/// The most of a probe's answer read (a models list or a metrics page is far less).
const MAX_ANSWER_BYTES: usize = 4 << 20;

pub struct Prober {
    connector: Connector,
}

impl Default for Prober {
    fn default() -> Self {
        Prober {
            connector: Connector::new(None),
        }
    }
}

/// A probe's answer.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Prober {
    /// Sends `request` (a GET) to `peer` and reads the answer, all of it within `timeout`.
    pub async fn get(
        &self,
        peer: &HttpPeer,
        request: RequestHeader,
        timeout: Duration,
    ) -> Result<Answer, String> {
        tokio::time::timeout(timeout, self.get_unbounded(peer, request))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    async fn get_unbounded(
        &self,
        peer: &HttpPeer,
        request: RequestHeader,
    ) -> Result<Answer, String> {
        // A probe speaks HTTP/1.1 even to a backend whose requests go over HTTP/2: this
        // connector reads HTTP/1 answers only.
        let mut peer = peer.clone();
        peer.options.alpn = pingora_core::protocols::ALPN::H1;
        let peer = &peer;
        let (mut session, _reused) = self
            .connector
            .get_http_session(peer)
            .await
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(request))
            .await
            .map_err(|e| e.to_string())?;
        session.read_response().await.map_err(|e| e.to_string())?;
        let status = session
            .resp_header()
            .map_or(0, |header| header.status.as_u16());
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_body_bytes().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        self.connector
            .release_http_session(session, peer, Some(Duration::from_secs(60)))
            .await;
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

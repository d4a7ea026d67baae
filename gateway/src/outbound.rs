//! How does the gateway make HTTP calls of its own (a backend's health, load and models; an
//! identity provider's key set; a spend-alert webhook)? Through pingora's connector, so that
//! `https://` works (rustls on ring, the system's roots, `SSL_CERT_FILE` honoured) without a
//! second TLS stack, and a backend probe travels with the very peer its requests use (its
//! TLS name, trust and client certificate).

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::v1::Connector;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::time::Duration;

/// The most of an answer read (a models list, a metrics page or a key set is far less).
const MAX_ANSWER_BYTES: usize = 4 << 20;

pub struct Outbound {
    connector: Connector,
}

impl Default for Outbound {
    fn default() -> Self {
        crate::tls::install_crypto_provider();
        Outbound {
            connector: Connector::new(None),
        }
    }
}

/// An answer, read whole.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl Outbound {
    /// Sends `request` (and `body`) to `peer` and reads the answer, all within `timeout`.
    pub async fn send(
        &self,
        peer: &HttpPeer,
        request: RequestHeader,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut answer = BytesMut::new();
        let read_whole = |_status: u16, chunk: &[u8]| {
            if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
            }
            answer.extend_from_slice(chunk);
            Ok(())
        };
        let exchange = Box::pin(self.exchange(peer, request, body, read_whole));
        let status = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        Ok(Answer {
            status,
            body: answer.freeze(),
        })
    }

    /// `method url` with `headers` (and `body`), within `timeout`, its host resolved now.
    pub async fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let target = Target::resolve(url).await?;
        self.call_target(&target, method, headers, body, timeout)
            .await
    }

    /// `method` on a resolved `target`, with `headers` (and `body`), within `timeout`.
    pub async fn call_target(
        &self,
        target: &Target,
        method: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let (peer, request) = target.request(method, headers, body.as_ref(), timeout)?;
        self.send(&peer, request, body, timeout).await
    }

    /// `method` on `target` with `headers`, the answer's status and body handed to `sink`
    /// piece by piece as they arrive, so that an answer of any size is never held here (an
    /// export). `read_timeout` bounds the connection and each read, not the whole answer.
    pub async fn stream(
        &self,
        target: &Target,
        method: &str,
        headers: &[(&str, &str)],
        read_timeout: Duration,
        sink: impl FnMut(u16, &[u8]) -> Result<(), String>,
    ) -> Result<u16, String> {
        let (peer, request) = target.request(method, headers, None, read_timeout)?;
        Box::pin(self.exchange(&peer, request, None, sink)).await
    }

    /// One request and its answer: the status, with each piece of the body given to `sink`.
    /// Its future is large (~12 KB: pingora's connector and session); callers box it, so
    /// that it does not inflate every future that might call out (the proxy's request
    /// phase would copy it on every request, calling out or not).
    async fn exchange(
        &self,
        peer: &HttpPeer,
        request: RequestHeader,
        body: Option<Bytes>,
        mut sink: impl FnMut(u16, &[u8]) -> Result<(), String>,
    ) -> Result<u16, String> {
        // HTTP/1.1 even to a backend whose requests go over HTTP/2: this connector reads
        // HTTP/1 answers only.
        let mut peer = peer.clone();
        peer.options.alpn = ALPN::H1;
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
        if let Some(body) = body {
            session.write_body(&body).await.map_err(|e| e.to_string())?;
            session.finish_body().await.map_err(|e| e.to_string())?;
        }
        session.read_response().await.map_err(|e| e.to_string())?;
        let status = session
            .resp_header()
            .map_or(0, |header| header.status.as_u16());
        while let Some(chunk) = session.read_body_bytes().await.map_err(|e| e.to_string())? {
            sink(status, &chunk)?;
        }
        self.connector
            .release_http_session(session, peer, Some(Duration::from_secs(60)))
            .await;
        Ok(status)
    }
}

/// A URL made ready to call: where it connects (TLS with its host's name for `https://`),
/// the `Host` it sends, and its path.
#[derive(Clone)]
pub struct Target {
    peer: HttpPeer,
    host: String,
    path: String,
}

impl Target {
    /// Parses `url` and resolves its host.
    pub async fn resolve(url: &str) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("'{url}': {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("'{url}' is not an http:// or https:// URL")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("'{url}' has no host"))?;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host().trim_matches(['[', ']']);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} resolves to no address"))?;
        let server_name = if https {
            host.to_owned()
        } else {
            String::new()
        };
        Ok(Target {
            peer: HttpPeer::new(addr, https, server_name),
            host: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }

    /// The same URL, its `https://` server checked against `trust`'s CA (instead of the
    /// system's roots) and shown its client certificate, when it has them.
    pub fn trusting(mut self, trust: &crate::tls::BackendTrust) -> Target {
        if trust.ca.is_some() {
            self.peer.options.ca = trust.ca.clone();
        }
        self.peer.client_cert_key = trust.client_cert.clone();
        self
    }

    /// Where to send `method` with `headers` (and a body of `body`'s length), each wait
    /// bounded by `timeout`, and the request's header.
    fn request(
        &self,
        method: &str,
        headers: &[(&str, &str)],
        body: Option<&Bytes>,
        timeout: Duration,
    ) -> Result<(HttpPeer, RequestHeader), String> {
        let mut peer = self.peer.clone();
        peer.options.connection_timeout = Some(timeout);
        peer.options.read_timeout = Some(timeout);
        let mut request =
            RequestHeader::build(method, self.path.as_bytes(), None).map_err(|e| e.to_string())?;
        let set = |request: &mut RequestHeader, name: &str, value: &str| {
            request
                .insert_header(name.to_owned(), value)
                .map_err(|e| e.to_string())
        };
        set(&mut request, "host", &self.host)?;
        for (name, value) in headers {
            set(&mut request, name, value)?;
        }
        if let Some(body) = body {
            set(&mut request, "content-length", &body.len().to_string())?;
        }
        Ok((peer, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that may call out is small whether it does or not: the proxy's request
    /// phase holds one (an identity provider's keys, the semantic cache's embedder) and
    /// moved the whole of its state on every request when the exchange was inline.
    #[test]
    fn a_call_out_is_a_small_future() {
        let outbound = Outbound::default();
        let call = outbound.call(
            "GET",
            "http://127.0.0.1:9/",
            &[],
            None,
            Duration::from_secs(1),
        );
        let size = std::mem::size_of_val(&call);
        assert!(size < 4096, "a call's future is {size} bytes");
    }
}

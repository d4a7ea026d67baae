//! What does pingora cost by itself? A reverse proxy on the same pingora (version, features
//! and vendored patches) as the gateway, doing nothing but forwarding to one upstream: the
//! floor `loadtest/bench-overhead.sh` measures Sluice's full policy path against.
//!
//!   bare-pingora --listen 127.0.0.1:19104 --upstream 127.0.0.1:19100 --threads 2

use async_trait::async_trait;
use clap::Parser;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_proxy::{ProxyHttp, Session};
use std::net::SocketAddr;

// The gateway's allocator, so that the two differ only in what the gateway does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Forward {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        Forward {
            upstream: args.upstream,
        },
        "bare-pingora",
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run(pingora_core::server::RunArgs::default());
}
